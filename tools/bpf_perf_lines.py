#!/usr/bin/env python3
"""Where a loaded BPF program spends its time, by source line.

Debian's perf and bpftool are built without libbfd, so neither can
annotate a JIT-compiled program. This reads what the kernel keeps instead:
the program's line info and the JIT address of each line record
(BPF_OBJ_GET_INFO_BY_FD), plus `bpftool prog dump xlated ... linum` for the
source text, and maps the samples of `perf script` that fall inside the
program to source lines and to the helpers and map lookups it calls.

    # while the workload runs (the program must be loaded):
    tools/bpf_perf_lines.py dump ID /tmp/prog
    perf record -a -g -F 10000 -o /tmp/perf.data -- sleep 15
    perf script -i /tmp/perf.data > /tmp/stacks.txt
    tools/bpf_perf_lines.py report /tmp/prog /tmp/stacks.txt hw_connect4

Pick the program by id with `bpftool prog show name NAME`; when several
share the name, the one perf sampled is the one whose address in
/proc/kallsyms matches perf's frames (perf may print a tag it cached
earlier for that address). Root only; x86_64. A development aid, not part
of the agent or its tests.
"""
import bisect
import collections
import ctypes
import json
import re
import struct
import subprocess
import sys

SYS_BPF = 321  # x86_64
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
INFO_SIZE = 256
# Offsets in struct bpf_prog_info (include/uapi/linux/bpf.h).
JITED_PROG_LEN, JITED_PROG_INSNS = 16, 24
NR_JITED_KSYMS, JITED_KSYMS = 104, 112
NR_LINE_INFO, LINE_INFO, JITED_LINE_INFO = 148, 152, 160
NR_JITED_LINE_INFO, LINE_INFO_REC_SIZE, JITED_LINE_INFO_REC_SIZE = 168, 172, 176

libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd, attr):
    """The bpf(2) syscall; returns its result (a file descriptor for some
    commands)."""
    buf = ctypes.create_string_buffer(bytes(attr), len(attr))
    ret = libc.syscall(SYS_BPF, cmd, buf, len(attr))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf command {cmd} failed")
    return ret


def prog_info(fd, request):
    out = ctypes.create_string_buffer(bytes(request), INFO_SIZE)
    attr = bytearray(16)
    struct.pack_into("IIQ", attr, 0, fd, INFO_SIZE, ctypes.addressof(out))
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)
    return out.raw


def dump(prog_id, prefix):
    attr = bytearray(16)
    struct.pack_into("I", attr, 0, prog_id)
    fd = bpf(BPF_PROG_GET_FD_BY_ID, attr)
    info = prog_info(fd, bytearray(INFO_SIZE))
    n_ksyms = struct.unpack_from("I", info, NR_JITED_KSYMS)[0]
    n_lines = struct.unpack_from("I", info, NR_LINE_INFO)[0]
    n_jlines = struct.unpack_from("I", info, NR_JITED_LINE_INFO)[0]
    line_rec, jline_rec = struct.unpack_from("II", info, LINE_INFO_REC_SIZE)
    ksyms = (ctypes.c_uint64 * max(n_ksyms, 1))()
    lines = ctypes.create_string_buffer(max(n_lines * line_rec, 1))
    jlines = (ctypes.c_uint64 * max(n_jlines, 1))()
    request = bytearray(INFO_SIZE)
    struct.pack_into("I", request, NR_JITED_KSYMS, n_ksyms)
    struct.pack_into("Q", request, JITED_KSYMS, ctypes.addressof(ksyms))
    struct.pack_into("I", request, NR_LINE_INFO, n_lines)
    struct.pack_into("QQ", request, LINE_INFO, ctypes.addressof(lines), ctypes.addressof(jlines))
    struct.pack_into("III", request, NR_JITED_LINE_INFO, n_jlines, line_rec, jline_rec)
    prog_info(fd, request)
    start = ksyms[0]
    records = []
    for i in range(n_lines):
        insn = struct.unpack_from("I", lines.raw, i * line_rec)[0]
        records.append({"insn": insn, "jit": jlines[i] - start})
    with open(prefix + ".json", "w") as f:
        json.dump({"start": start, "lines": records}, f)
    xlated = subprocess.run(
        ["bpftool", "prog", "dump", "xlated", "id", str(prog_id), "linum"],
        check=True, capture_output=True, text=True,
    ).stdout
    with open(prefix + ".xlated", "w") as f:
        f.write(xlated)
    print(f"program {prog_id} at {start:#x}: {n_lines} line records -> {prefix}.json, {prefix}.xlated")


def report(prefix, stacks_path, name):
    records = sorted(json.load(open(prefix + ".json"))["lines"], key=lambda r: r["jit"])
    jit_offsets = [r["jit"] for r in records]
    source, insns, current = {}, {}, None
    for line in open(prefix + ".xlated"):
        m = re.match(r"^; (.*) \[file:(\S+) line_num:(\d+)", line)
        if m:
            current = f"{m.group(2).rsplit('/', 1)[-1]}:{m.group(3)} {m.group(1)[:60]}"
            continue
        m = re.match(r"^\s*(\d+): (.*)", line)
        if m:
            insns[int(m.group(1))] = m.group(2)
            if current:
                source[int(m.group(1))] = current
    calls = sorted(i for i, text in insns.items() if "(85) call" in text)

    def group_at(offset):
        """The instructions of the line record holding JIT `offset`."""
        i = bisect.bisect_right(jit_offsets, offset) - 1
        if i < 0:
            return 0, 0
        end = records[i + 1]["insn"] if i + 1 < len(records) else max(insns, default=0) + 1
        return records[i]["insn"], end

    def call_before(offset):
        # A frame's address is the return address: the call is the last
        # one in the line record holding the byte before it.
        first, end = group_at(offset - 1)
        inside = [c for c in calls if first <= c < end]
        return inside[-1] if inside else first

    def map_of_call(insn):
        # The map a lookup call reads: the last `r1 = map[id:N]` before it.
        for k in range(insn - 1, max(insn - 40, -1), -1):
            m = re.search(r"r1 = map\[id:(\d+)\]", insns.get(k, ""))
            if m:
                return f"map id {m.group(1)}"
        return ""

    own, called, total = collections.Counter(), collections.Counter(), 0
    for block in open(stacks_path).read().split("\n\n"):
        frames = [l.split()[1] for l in block.strip().split("\n")[1:] if l.strip()]
        inside = [i for i, f in enumerate(frames) if name in f]
        if not inside:
            continue
        total += 1
        i = inside[0]
        offset = int(frames[i].split("+")[1], 16)
        if i == 0:
            own[source.get(group_at(offset)[0], "?")] += 1
        else:
            site = call_before(offset)
            text = insns.get(site, "")
            lookup = map_of_call(site) if "lookup" in text else ""
            callee = frames[i - 1].split("+")[0]
            called[(f"insn {site}", text[:48], lookup, callee)] += 1
    print(f"{total} samples in {name}; {sum(own.values())} in its own code")
    print("\ncalls out (call site, callee):")
    for key, n in called.most_common(20):
        print(f"{n:6d} {100 * n / total:5.1f}%  {' | '.join(k for k in key if k)}")
    print("\nits own code, by source line:")
    for key, n in own.most_common(30):
        print(f"{n:6d} {100 * n / total:5.1f}%  {key}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "dump":
        dump(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) == 5 and sys.argv[1] == "report":
        report(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        sys.exit(__doc__)
