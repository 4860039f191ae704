run sw4_both_csboth_plain --router --server-write 4 --checksum both --direction both --connections 300 --seed 66
