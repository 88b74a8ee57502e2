"""What a Slurm job of the tests runs, as the unprivileged job user, with the system python3.

    job.py MAP probe              which GPU and capability nodes this job opens (errno each)
    job.py MAP write SECRET       fill the memory of every partition this job can open
    job.py MAP read SECRET        count SECRET in the memory of every partition it can open
    job.py MAP sleep SECONDS      hold on, for the tests that need a running job

MAP (JSON, written by the test as root) lists the simulated node's device nodes and, per
partition, its own nodes and its byte ranges of the simulated memory (from accelguard's own
mapping). A job finds its partitions the way a tenant would: by the nodes it can open. Prints
one JSON object.
"""

import errno
import json
import os
import sys
import time
from pathlib import Path


def opens(path):
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as error:
        return error.errno
    return 0


def main():
    mapping = json.loads(Path(sys.argv[1]).read_text())
    verb = sys.argv[2]
    result = {"job": os.environ.get("SLURM_JOB_ID", ""), "uid": os.getuid()}
    probed = {path: opens(path) for path in mapping["nodes"]}
    result["probe"] = probed
    mine = [
        uuid
        for uuid, partition in mapping["partitions"].items()
        if all(probed.get(node) == errno.ENXIO for node in partition["own"])
    ]
    result["partitions"] = mine
    if verb in ("write", "read"):
        secret = sys.argv[3].encode()
        found = 0
        for uuid in mine:
            for path, offset, length in mapping["partitions"][uuid]["ranges"]:
                with Path(path).open("r+b" if verb == "write" else "rb") as memory:
                    if verb == "write":
                        block = (secret * (length // len(secret) + 1))[:length]
                        memory.seek(offset)
                        memory.write(block)
                    else:
                        memory.seek(offset)
                        found += memory.read(length).count(secret)
        result["found"] = found
    elif verb == "sleep":
        time.sleep(float(sys.argv[3]))
    print(json.dumps(result))


main()
