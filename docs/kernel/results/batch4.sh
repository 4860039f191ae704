cd /work/main/docs/kernel && source results/run4.sh
# 4-way matrix with the trigger (server writes 4 bytes right after accept), router topology
run sw4_csboth_tfo   --router --server-write 4 --checksum both --tfo --connections 600 --seed 41
run sw4_csboth_plain --router --server-write 4 --checksum both       --connections 600 --seed 42
run sw4_csoff_tfo    --router --server-write 4 --checksum off  --tfo --connections 600 --seed 43
run sw4_csoff_plain  --router --server-write 4 --checksum off        --connections 600 --seed 44
# same without the trigger
run sw0_csboth_tfo   --router --checksum both --tfo --connections 300 --seed 45
run sw0_csboth_plain --router --checksum both       --connections 300 --seed 46
run sw0_csoff_tfo    --router --checksum off  --tfo --connections 300 --seed 47
run sw0_csoff_plain  --router --checksum off        --connections 300 --seed 48
# checksum on one end only
run sw4_csclient_tfo --router --server-write 4 --checksum client --tfo --connections 600 --seed 49
run sw4_csserver_tfo --router --server-write 4 --checksum server --tfo --connections 600 --seed 50
# one path; other rates
run sw4_p1_csboth_tfo  --router --server-write 4 --checksum both --tfo --paths 1 --connections 300 --seed 51
run sw4_p1_csoff_tfo   --router --server-write 4 --checksum off  --tfo --paths 1 --connections 300 --seed 52
run sw4_r20_csboth_tfo   --router --server-write 4 --checksum both --tfo --rate 20   --connections 300 --seed 53
run sw4_r1000_csboth_tfo --router --server-write 4 --checksum both --tfo --rate 1000 --connections 300 --seed 54
# when the early write happens
run sw4_afr_csboth_tfo --router --server-write 4 --server-write-when after-first-read --checksum both --tfo --connections 300 --seed 55
run sw4_est_csboth_tfo --router --server-write 4 --server-write-when established      --checksum both --tfo --connections 300 --seed 56
# no router
run sw4_norouter_csboth_tfo --server-write 4 --checksum both --tfo --connections 600 --seed 57
