"""A stand-in worker for launcher tests: rank 1 fails at once, the others wait to be stopped."""
import os
import sys
import time

if __name__ == "__main__":
    pid_dir = sys.argv[1]
    with open(os.path.join(pid_dir, f"rank{os.environ['RANK']}.pid"), "w") as f:
        f.write(str(os.getpid()))
    if os.environ["RANK"] == "1":
        time.sleep(0.5)
        sys.exit(3)
    time.sleep(120)
