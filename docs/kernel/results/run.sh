run () 
{ 
    n=$1;
    shift;
    python3 repro_dss_corruption.py --json results/$n.json "$@" > results/$n.txt 2>&1;
    echo "$n: $(grep -E '^transfers' results/$n.txt) | S: $(grep 'server counter' results/$n.txt | grep -oE '(DSSNotMatching|MPRstTx|DuplicateData|MPTCPRetrans|MPRstRx|NoDSSInWindow|DSS\w*) \+[0-9]+' | tr '\n' ' ') | C: $(grep 'client counter' results/$n.txt | grep -oE '(DSSNotMatching|MPRstTx|DuplicateData|MPTCPRetrans|MPRstRx|NoDSSInWindow|DSS\w*) \+[0-9]+' | tr '\n' ' ') | $(grep -o 'median goodput [0-9.]*' results/$n.txt) $(grep -o "subflows_total: .*" results/$n.txt)"
}
