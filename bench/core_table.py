"""Print the Cython/reference ratio table from a pytest-benchmark JSON file.

python3 bench/core_table.py bench/results/core.json
"""
import json
import sys


def main(path):
    data = json.load(open(path))
    med = {}
    for b in data["benchmarks"]:
        info = b["extra_info"]
        med[(info["impl"], info["policy"], info["n"])] = b["stats"]["median"]
    print("| policy | N | reference pick | Cython pick() | ratio | cdef path, per pick |")
    print("|---|---|---|---|---|---|")
    for policy in ("round_robin", "random", "least_conn", "maglev"):
        for n in (4, 100, 1000):
            ref = med.get(("reference", policy, n))
            ref = ref / 1024 if ref else None
            fast = med[("cython", policy, n)] / 1024
            cdef = med[("cython-cdef-x1000", policy, n)] / 1000
            ref_s = f"{ref * 1e9:,.0f} ns" if ref else "n/a"
            ratio = f"{ref / fast:,.0f}x" if ref else "n/a"
            print(f"| {policy} | {n} | {ref_s} | {fast * 1e9:,.0f} ns | {ratio} | {cdef * 1e9:,.1f} ns |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results/core.json")
