cd /work/main/docs/kernel && source results/run.sh
run cs_client --connections 100 --checksum client
run cs_server --connections 100 --checksum server
run p1_r100 --connections 100 --paths 1
run r20_router --connections 100 --rate 20 --router
run r1000_router --connections 100 --rate 1000 --router
run down_router --connections 100 --direction down --router
run down_r20_nb --connections 100 --direction down --rate 20 --reader nonblocking
run par10_router_nb --connections 100 --parallel 10 --router --reader nonblocking
run shortq --connections 100 --tbf-queue-ms 1 --tbf-burst-ms 0.5
run tfo1_p1 --direction down --size 20000000 --rate 40 --connections 3 --paths 1 --tfo
run tfo1_csclient --direction down --size 20000000 --rate 40 --connections 2 --checksum client --tfo
run tfo1_csoff_b --direction down --size 20000000 --rate 40 --connections 3 --tfo --seed 2
