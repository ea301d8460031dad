"""The headline table of a release: every artifact's size, faithfulness and speed, from its
bench results, for README.md.

    python -m kvant.bench.studies.headline out/release/normistral-stand-in/bench/results.json \\
        --out docs/results/headline.json --made-by 'make demo'

Mean KLD and top-1 agreement are the means over the bench's languages; speed and peak RSS
are the row at the smallest context the bench ran.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvant.bench.report import speed_cell
from kvant.bench.tables import command_line, markdown, table_doc, write_table
from kvant.errors import run_script

COLUMNS = ["artifact", "format", "size (MiB)", "mean KLD", "top-1 agreement",
           "prefill tok/s", "decode tok/s", "peak RSS (MiB)"]


NOISY = ("⚠: the row stayed noisy after the bench's repeated attempts (its runs spread more, "
         "or other programs took more CPU, than the bench's limits): read it as a rough "
         "figure; bench/report.md says why per row.")


def table(results: dict, command: str) -> dict:
    rows, ctxs, noisy = [], set(), False
    for name, entry in results["targets"].items():
        quality = list(entry.get("quality", {}).values())
        kld = sum(q["mean_kld"] for q in quality) / len(quality) if quality else None
        top1 = sum(q["top1_agreement_pct"] for q in quality) / len(quality) if quality else None
        speed = {int(c): s for c, s in entry.get("speed", {}).items() if "error" not in s}
        s = speed[min(speed)] if speed else {}
        ctxs |= {min(speed)} if speed else set()
        noisy = noisy or bool(s.get("noisy"))  # only the rows shown: their cells carry the ⚠
        rows.append([name, entry["format"], f"{entry['size_bytes'] / 2**20:,.1f}",
                     "reference" if kld is None else f"{kld:.6f}",
                     "-" if top1 is None else f"{top1:.2f}%",
                     speed_cell(s, "prefill") if s else "-",
                     speed_cell(s, "decode") if s else "-",
                     f"{s['peak_rss_mib']:,.0f}" if s else "-"])
    langs = sorted({lang for e in results["targets"].values() for lang in e.get("quality", {})})
    return table_doc(f"Every artifact of the release against the bf16 reference (KLD and top-1: "
                     f"mean over {', '.join(langs)}; speed at {', '.join(map(str, sorted(ctxs)))} "
                     "tokens, median (min-max))", COLUMNS, rows, command,
                     notes=NOISY if noisy else "", machine_info=results["machine"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a kvant bench results.json")
    parser.add_argument("--out", type=Path, required=True, help="the table's JSON")
    parser.add_argument("--made-by", default="", help="the command that wrote results.json "
                        "(e.g. make demo), named in the table's caption")
    args = parser.parse_args()
    results = json.loads(args.results.read_text(encoding="utf-8"))
    command = command_line([str(args.results), "--out", str(args.out)],
                           "kvant.bench.studies.headline")
    doc = table(results, f"{args.made_by} && {command}" if args.made_by else command)
    write_table(args.out, doc)
    sys.stdout.write(markdown(doc) + "\n")


if __name__ == "__main__":
    run_script(main, "kvant.bench.studies.headline")
