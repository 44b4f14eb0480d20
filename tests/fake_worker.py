"""A stand-in worker for launcher tests: records its rank variables and pid, then behaves as told.

    python -m fake_worker DIR fail   rank 1 exits 3 after a moment, the others wait to be stopped
    python -m fake_worker DIR ok     every rank exits 0
    python -m fake_worker DIR wait   every rank waits (to be ended with its launcher)
"""
import json
import os
import sys
import time

if __name__ == "__main__":
    from akd_cli.mm.worker import end_with_parent

    end_with_parent()  # as akd's worker entry does first
    out_dir, mode = sys.argv[1:3]
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "CUDA_VISIBLE_DEVICES", "AKD_LAUNCHER_PID")
    with open(os.path.join(out_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"pid": os.getpid(), **{k: os.environ.get(k) for k in keys}}, f)
    if mode == "fail":
        if os.environ["RANK"] == "1":
            time.sleep(0.5)
            sys.exit(3)
        time.sleep(120)
    elif mode == "wait":
        time.sleep(120)
