cd /work/main/docs/kernel && source results/run4.sh
while pgrep -f "results/batch4.sh" >/dev/null; do sleep 2; done
# size of the reverse write
run sw1_csboth_tfo     --router --server-write 1     --checksum both --tfo --connections 300 --seed 61
run sw1400_csboth_tfo  --router --server-write 1400  --checksum both --tfo --connections 300 --seed 62
run sw65536_csboth_tfo --router --server-write 65536 --checksum both --tfo --connections 300 --seed 63
# no router, checksums off
run sw4_norouter_csoff_plain --server-write 4 --checksum off --connections 600 --seed 64
# both directions at once (server streams 512 KiB back after the verdict) with the trigger
run sw4_both_csoff_plain --router --server-write 4 --checksum off --direction both --connections 300 --seed 65
