cd /work/main/docs/kernel && source results/run.sh
while pgrep -f "results/batch2.sh" >/dev/null; do sleep 2; done
run default_500 --connections 500 --seed 11
python3 -c "while True: pass" & L1=$!
python3 -c "while True: pass" & L2=$!
run load2_default --connections 200 --seed 12
run load2_router_r100_nb --connections 200 --router --reader nonblocking --seed 13
run load2_down --connections 200 --direction down --seed 14
run load2_par10 --connections 200 --parallel 10 --seed 15
kill $L1 $L2
run r1000_8m --connections 30 --rate 1000 --size 8388608 --seed 16
