"""The early-write fault in the project's lab: a direct MPTCP upload whose server writes first.

    .venv/bin/python docs/kernel/lab_early_write.py N on|off tfo|notfo none|early|read-then-write|established [server|proxy]

The lab-based twin of repro_dss_corruption.py (it uses the project's lab module for
the namespaces; no proxy code): N connections, each a 4-byte index then 512 KiB
up; the server (in the server or the proxy namespace) writes 4 bytes as told, reads
to EOF and compares. Prints the wrong transfers (index, length, first wrong
offset, where the wrong bytes come from) and the MPTcpExt counters.
"""
import hashlib, os, socket, struct, sys, threading, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src"))
from mptcp_proxy.lab import Lab, PathSpec
from mptcp_proxy.lab.traffic import set_client_subflows

N = int(sys.argv[1]); CSUM = sys.argv[2] == "on"; TFO = sys.argv[3] == "tfo"; WMODE = sys.argv[4] if len(sys.argv) > 4 else "none"; EARLY = WMODE != "none"; NS = sys.argv[5] if len(sys.argv) > 5 else "server"
SIZE = 512 * 1024
POOL = os.urandom(SIZE * 16)
def window(i): s = (i * 7919 * 64) % (len(POOL) - SIZE); return POOL[s:s + SIZE]
wrong = []; STATES = []
with Lab.create([PathSpec(rate_mbit=100), PathSpec(rate_mbit=100)], dss_checksum=CSUM) as lab:
    set_client_subflows(lab, 2)
    for n in (lab.client, lab.server, lab.proxy):
        n.sysctl("net.ipv4.tcp_fastopen", 3)
    node = getattr(lab, NS)
    with node.enter():
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.setsockopt(socket.IPPROTO_TCP, 23, 64)
    ls.setsockopt(socket.IPPROTO_TCP, 34, 1)
    ls.bind(("0.0.0.0", 9000)); ls.listen(64)
    def serve():
        while True:
            try: c, _ = ls.accept()
            except OSError: return
            threading.Thread(target=handle, args=(c,), daemon=True).start()
    def handle(c):
        with c:
            got = bytearray()
            if WMODE == "early":
                c.sendall(b"ansr")
            elif WMODE == "read-then-write":
                while len(got) < 4:
                    got += c.recv(4 - len(got))
                st = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
                STATES.append(st)
                c.sendall(b"ansr")
            elif WMODE == "established":
                while c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == 3:
                    time.sleep(0.0002)
                c.sendall(b"ansr")
            while ch := c.recv(65536): got += ch
            i, = struct.unpack("!I", got[:4]); exp = window(i)
            if bytes(got[4:]) != exp:
                first = next((k for k,(a,b) in enumerate(zip(exp, got[4:])) if a != b), None)
                src = exp.find(bytes(got[4+first:4+first+64])) if first is not None else None
                wrong.append((i, len(got) - 4, first, src))
            c.sendall(b"ok")
    threading.Thread(target=serve, daemon=True).start()
    addr = (lab.server_addr if NS == "server" else lab.paths[0].proxy_addr, 9000)
    for i in range(N):
        with lab.client.enter():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM, 262)
        s.setsockopt(socket.IPPROTO_TCP, 34, 1)
        s.settimeout(30)
        if TFO:
            s.sendto(struct.pack("!I", i), socket.MSG_FASTOPEN, addr)
        else:
            s.connect(addr); s.sendall(struct.pack("!I", i))
        s.sendall(window(i)); s.shutdown(socket.SHUT_WR)
        r = b""
        while ch := s.recv(10): r += ch
        assert r == (b"ansrok" if EARLY else b"ok"), r
        s.close()
    time.sleep(0.5)
    print(f"N={N} csum={CSUM} tfo={TFO}: wrong {len(wrong)}: {wrong[:5]}")
    print("client", {k: v for k, v in lab.client.netstat().get("MPTcpExt", {}).items() if v and k in ("DSSNotMatching","DataCsumErr","MPRstTx","MPRstRx","DuplicateData","MPTCPRetrans","MPJoinAckRx")})
    print("server", {k: v for k, v in node.netstat().get("MPTcpExt", {}).items() if v and k in ("DSSNotMatching","DataCsumErr","MPRstTx","MPRstRx","DuplicateData","MPTCPRetrans","MPJoinSynRx")})
    print("states at write", {x: STATES.count(x) for x in set(STATES)})
    print("tfo passive", lab.server.netstat().get("TcpExt", {}).get("TCPFastOpenPassive"))
