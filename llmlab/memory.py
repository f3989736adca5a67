"""How much memory a model may still take, so that one too big is refused with its size before any of
it is allocated, instead of dying halfway through (or freezing the machine).

On the CPU three numbers can each be the one that runs out first, and the smallest is what is free:

    MemAvailable      /proc/meminfo: what the kernel can hand out without swapping
    RLIMIT_AS         the process's address-space limit (`ulimit -v`), less what it maps already
    the cgroup limit  a container's or a job's memory limit (cgroup v2 memory.max, v1
                      memory.limit_in_bytes), less its usage, on its own group and every group above
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from .errors import LlmlabError

UNKNOWN = 1 << 62       # no number to go by: refuse nothing
CGROUP_ROOT = Path("/sys/fs/cgroup")


def free_memory_bytes(device: torch.device) -> int:
    return min(free_memory_by_limit(device).values())


def free_memory_by_limit(device: torch.device) -> dict[str, int]:
    """What each limit leaves free, by the limit's name (only the limits this machine has)."""
    if device.type == "cuda":
        # what the driver has free, plus what PyTorch's allocator holds cached but not in use
        # (freed tensors' blocks, e.g. a previous model's), which it hands out before asking the driver
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return {"the GPU": torch.cuda.mem_get_info(device)[0] + cached}
    limits = {"MemAvailable": mem_available(), "the address-space limit (RLIMIT_AS)": address_space_left(),
              "the cgroup memory limit": cgroup_memory_left()}
    return {name: n for name, n in limits.items() if n is not None} or {"unknown": UNKNOWN}


def check_fits(n_bytes: int, device: torch.device, what: str) -> None:
    free = free_memory_by_limit(device)
    limit = min(free, key=free.get)
    if n_bytes > free[limit]:
        raise LlmlabError(
            f"{what} needs {n_bytes / 2**30:.1f} GiB but {device} has only {free[limit] / 2**30:.1f} GiB free "
            f"(by {limit}); choose a smaller model or dtype (bf16 halves fp32), or another device"
        )


def mem_available() -> int | None:
    with contextlib.suppress(OSError):   # no /proc/meminfo on macOS or Windows
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def address_space_left() -> int | None:
    """RLIMIT_AS less the address space mapped now (/proc/self/statm's first field, in pages)."""
    try:
        import resource
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit == resource.RLIM_INFINITY:
            return None
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (ImportError, OSError, ValueError):
        return None
    return max(limit - mapped, 0)


def cgroup_memory_left() -> int | None:
    """The tightest (limit - usage) over this process's memory cgroup and the groups above it.

    Usage counts the page cache, which the kernel drops before it runs out; the inactive part of it
    (memory.stat's inactive_file) is subtracted, as `docker stats` and Kubernetes' working set do.
    """
    lefts = [left for folder in _cgroup_folders() if (left := _cgroup_left(folder)) is not None]
    return min(lefts, default=None)


def _cgroup_folders() -> list[Path]:
    """/proc/self/cgroup names the group ("0::/path" for v2, "N:memory:/path" for v1); where that
    path is not mounted as such (inside a container it often is "/"), the mount's root still applies."""
    folders = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":                                    # v2: one hierarchy
                mount = CGROUP_ROOT
            elif "memory" in controllers.split(","):                 # v1: the memory controller's own
                mount = CGROUP_ROOT / "memory"
            else:
                continue
            folder = mount / path.lstrip("/")
            folders += [folder, *folder.parents[:len(folder.parents) - len(mount.parents)]]
    return folders


def _cgroup_left(folder: Path) -> int | None:
    for limit_file, usage_file, inactive_key in (
            ("memory.max", "memory.current", "inactive_file"),                               # v2
            ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")):      # v1
        with contextlib.suppress(OSError, ValueError):
            limit = (folder / limit_file).read_text().strip()
            if limit == "max" or int(limit) >= UNKNOWN:   # v1 writes "no limit" as 2^63 rounded to a page
                return None
            usage = int((folder / usage_file).read_text())
            stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
            return max(int(limit) - (usage - int(stat.get(inactive_key, 0))), 0)
    return None
