# source me; run NAME ARGS...  (writes NAME.txt / NAME.json, prints a one-line summary)
run () {
    n=$1; shift
    python3 repro_dss_corruption.py --json results/$n.json "$@" > results/$n.txt 2>&1
    K='(DataCsumErr|DSSNotMatching|DSSNoMatchTCP|DSSCorruption\w*|MPRstTx|MPRstRx|MPFailTx|MPFailRx|DuplicateData|MPTCPRetrans|NoDSSInWindow|InfiniteMap\w*|DSSFallback|MPFallback\w*) \+[0-9]+'
    echo "$n [$*]: $(grep -E '^transfers' results/$n.txt | cut -d' ' -f2-8) | srv: $(grep 'server counter' results/$n.txt | grep -oE "$K" | tr '\n' ' ')| cli: $(grep 'client counter' results/$n.txt | grep -oE "$K" | tr '\n' ' ')| $(grep -o 'median goodput [0-9.]*' results/$n.txt) | load $(grep -o 'loadavg before [0-9.]*' results/$n.txt | cut -d' ' -f3)"
    grep '^SIGNATURE' results/$n.txt | head -20
}
