"""Writing the workloads' reports (imported from the scripts' own directory)."""
import os


def publish(path, text):
    """Writes `text` to `path` atomically (a temporary file renamed over it), unless `path` is
    not a regular file (/dev/null, a FIFO): then it is written in place, never replaced."""
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, "w") as f:
            f.write(text)
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)
