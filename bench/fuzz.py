"""Fuzz the qformat readers with structure-aware mutations of valid files and folders.

    python bench/fuzz.py --cases 500 --seed 0                       # the reader (open_file + decode every record)
    python bench/fuzz.py --cases 100000 --jobs 2 --target reader    # the long run, by hand
    python bench/fuzz.py --cases 2000 --target folder               # verify_folder(deep=True) on mutated folders
    python bench/fuzz.py --target kernel --cases 300                # numba prepare vs the reference decoder
    python bench/fuzz.py --replay 1234 --save-crashes /tmp/crashes  # one case again, with its traceback
    python bench/fuzz.py --run-path /tmp/crashes/reader-seed0-case1234/case.safetensors   # a saved case

Each case runs in a forked child with an address-space cap (``--mem-mb`` on top of what the warm process maps) and
a timeout. A case is clean when the target succeeds or raises a qformat error (``FormatError`` with a spec code, or
another ``QformatError``); a signal, a timeout, the memory cap, or any other exception is a finding. Cases are
reproducible from (seed, target, case id); the exit status is 1 if any case was not clean.
The core lives in ``bench/qfuzz``; ``tests/fuzz/test_fuzz_short.py`` runs a short fixed-seed batch in CI.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread per child: the parallelism is --jobs, and forks stay simple
os.environ.setdefault("TQDM_DISABLE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qfuzz.runner import TARGETS, Options, format_report, replay, run_campaign  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--cases", type=int, default=500, help="number of cases (ids start at --first)")
    parser.add_argument("--first", type=int, default=0, help="first case id")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2, help="children running at once")
    parser.add_argument("--mem-mb", type=int, default=1024, help="address space a case may add (0: no cap)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per case")
    parser.add_argument("--target", choices=TARGETS, default="reader")
    parser.add_argument("--folder-seeds", choices=("synthetic", "tiny", "both"), default="both",
                        help="folder target: a synthetic folder, a converted tiny Llama (made once, cached), or both")
    parser.add_argument("--fs-special", action="store_true",
                        help="folder target: also FIFOs and /dev/zero symlinks in place of files (hangs by design)")
    parser.add_argument("--replay", type=int, action="append", metavar="CASE", help="rerun case ids, verbosely")
    parser.add_argument("--run-path", type=Path, action="append", metavar="PATH",
                        help="run the target on a saved file or folder (e.g. from --save-crashes), verbosely")
    parser.add_argument("--save-crashes", type=Path, metavar="DIR", help="keep each non-clean case's files here")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = Options(target=args.target, seed=args.seed, jobs=max(1, args.jobs), mem_mb=args.mem_mb,
                      timeout=args.timeout, folder_seeds=args.folder_seeds, fs_special=args.fs_special)
    flags = f"--target {args.target} --seed {args.seed} --mem-mb {args.mem_mb} --timeout {args.timeout:g}"
    if args.target == "folder":
        flags += f" --folder-seeds {args.folder_seeds}" + (" --fs-special" if args.fs_special else "")
    if args.replay or args.run_path:
        status = 0
        for case_id in [*(args.replay or []), *(args.run_path or [])]:
            result = replay(options, case_id, args.save_crashes)
            print(f"case {case_id} seed {result.seed_label}")
            for mutation in result.mutations:
                print(f"  - {mutation}")
            print(f"outcome: {result.outcome}  {json.dumps(result.detail, ensure_ascii=True)}")
            status |= not result.clean
        return status
    campaign = run_campaign(options, range(args.first, args.first + args.cases),
                            progress=lambda line: print(line, file=sys.stderr, flush=True),
                            save_dir=args.save_crashes)
    print(format_report(campaign, f"`python bench/fuzz.py {flags} --replay CASE`"))
    if args.json:
        args.json.write_text(json.dumps(campaign.to_json(), indent=1, ensure_ascii=True) + "\n")
    return 0 if not campaign.non_clean else 1


if __name__ == "__main__":
    sys.exit(main())
