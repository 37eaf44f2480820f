import json
import sys

a, b = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
bad = 0
for k in a:
    x, y = a[k], b.get(k)
    if y is None:
        print("missing", k)
        bad += 1
        continue
    if "err" in x or "err" in y:
        if x.get("err") != y.get("err"):
            print("ERR", k, x.get("err"), "|", y.get("err"))
            bad += 1
        continue
    sa = {kk: v for kk, v in x["stats"].items() if kk not in ("time",)}
    sb = {kk: v for kk, v in y["stats"].items() if kk not in ("time",)}
    d = max(abs(p - q) / max(abs(p), 1e-300) for p, q in zip(x["y"], y["y"]))
    if sa != sb or d > 1e-9:
        print(
            k,
            f"reldiff {d:.2e}",
            {kk: (sa.get(kk), sb.get(kk)) for kk in set(sa) | set(sb) if sa.get(kk) != sb.get(kk)},
        )
        bad += 1
print("differences:", bad, "of", len(a))
