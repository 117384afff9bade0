"""Which GPU-step setting gpu_session.sh runs train.py with: STEP:pfDEPTH (the step's launch setting, DALI's prefetch
depth) of the fastest end-to-end rate from DALI's original shards among the session's steps, train.py's defaults
(profile:pf2) unless another is 3 % faster.

    python3 benchmarks/pick_setting.py SESSION_DIR [STEP ...]   # default steps: profile launches

Prints the choice, then every rate found ("profile:pf2 9535 img/s ..."). The Python standard library only: it
runs before anything is installed, with any python3.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

DEFAULT = "profile:pf2"  # gpu_session.sh's profile step runs train.py's defaults (--dali-prefetch 2)
MARGIN = 1.03  # another setting must beat the defaults by this much: rates move ~2 % from round to round


def rates(session: Path, steps: list[str]) -> dict[str, float]:
    """{"STEP:pfDEPTH": images/s} of the DALI rows on the original shards in each STEP/throughput.json there."""
    found = {}
    for step in steps:
        try:
            result = json.loads((session / step / "throughput.json").read_text())
            rows = result["end_to_end"]
        except (OSError, ValueError, KeyError):
            continue  # the step failed or was skipped
        ran = result.get("settings", {}).get("dali_prefetch", [2])  # the depths the step ran (a JSON without: 2)
        # shards_dali(_cpu), "@pfDEPTH" where several ran (gpu_session.sh always runs 2 and 4), else the one that
        # ran; not the pre-resized shards, nor rows of other sweeps ("@hw1", "@legacy": gpu_session.sh runs none)
        for r in rows:
            m = re.fullmatch(r"shards_dali(?:_cpu)?(?:@pf(\d+))?", r["loader"])
            if m:
                found[f"{step}:pf{m[1] or ran[0]}"] = r["images_per_s"]
    return found


def pick(found: dict[str, float]) -> str:
    best = max(found, key=found.get, default=DEFAULT)
    return best if found.get(best, 0) > MARGIN * found.get(DEFAULT, 0) else DEFAULT


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stdout if len(sys.argv) > 1 else sys.stderr)
        sys.exit(0 if len(sys.argv) > 1 else 2)
    found = rates(Path(sys.argv[1]), sys.argv[2:] or ["profile", "launches"])
    print(pick(found), " ".join(f"{k} {v:.0f} img/s" for k, v in found.items()))
