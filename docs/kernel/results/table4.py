"""Print a markdown table of the sw* runs (reads NAME.json written by repro_dss_corruption.py)."""
import glob, json, math, os, sys
KEYS = ("DataCsumErr", "DSSNotMatching", "MPRstTx", "MPRstRx", "MPFailTx", "MPFailRx",
        "DSSCorruptionFallback", "DSSCorruptionReset", "DuplicateData", "MPTCPRetrans", "NoDSSInWindow")
def ub95(k, n):  # one-sided 95 % upper bound (exact for k == 0, Wilson-ish otherwise)
    if k == 0:
        return 1 - 0.05 ** (1 / n)
    p = k / n; z = 1.645
    return (p + z * z / (2 * n) + z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))) / (1 + z * z / n)
names = sys.argv[1:] or sorted(os.path.basename(f)[:-5] for f in glob.glob("sw*.json"))
print("| run (results/RUN.txt) | checksum | TFO | server write | paths | rate | router | n | wrong | % | receiver counters | sender counters | load (1-min, before) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for n in names:
    s = json.load(open(n + ".json")); c = s["config"]
    recv, send = ("server", "client") if c["direction"] in ("up", "both") else ("client", "server")
    def cnt(end):
        d = s["counters"][end]
        return ", ".join(f"{k} {d['MPTcpExt:' + k]}" for k in KEYS if d.get("MPTcpExt:" + k)) or "–"
    tot = s["ok"] + s["wrong"] + s["errors"]
    sw = f"{c['server_write']} B @{c['server_write_when']}" if c["server_write"] else "none"
    print(f"| {n} | {c['checksum']} | {'yes' if c['tfo'] else 'no'} | {sw} | {c['paths']} | {c['rate']} | "
          f"{'yes' if c['router'] else 'no'} | {tot} | **{s['wrong']}**{' (+%d err)' % s['errors'] if s['errors'] else ''} | "
          f"{100 * s['wrong'] / tot:.1f} | {cnt(recv)} | {cnt(send)} | {s.get('loadavg_before', '?').split()[0]} |")
