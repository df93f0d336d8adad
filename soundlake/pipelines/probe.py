"""Before a run on a cluster, every node proves that it reaches the lake and the inputs.

A lake on a path that a worker node sees as its own disk, or an input folder mounted on the
driver's machine only, would otherwise lose that node's writes without a word, or turn every
input into a permanent ``not_found`` failure. The driver writes a marker with a random token
into the lake; one task per node (pinned to it, no CPU reserved) reads the marker back and
opens a few of the listed local inputs. The first problem stops the run as one line naming
the node and the path.
"""
from __future__ import annotations

import os
import uuid

from soundlake.catalog.lake import Lake
from soundlake.core.audio import local_path
from soundlake.core.errors import UserError
from soundlake.core.storage import is_remote, put_bytes

SAMPLES = 3   # listed local inputs each node opens: the first, the middle and the last


def check_node(lake_uri: str, marker: str, token: str, inputs: list[str]) -> tuple[str, str] | None:
    """Runs on one node: None when it sees the marker's token and can open ``inputs``, else
    (what is wrong, the path)."""
    try:
        lake = Lake(lake_uri)
        with lake.fs.open_input_stream(marker) as f:
            seen = f.read().decode("utf-8", "replace")
    except (OSError, UserError):
        seen = None
    if seen != token:
        return "sees another folder (its own disk?) or none at the lake's path", lake_uri
    for path in inputs:
        if not os.access(path, os.R_OK):
            return "cannot read the input", path
    return None


def sample_inputs(rows: list[dict]) -> list[str]:
    """The paths of the first, middle and last listed local inputs (a file:// URL's escaped
    bytes decoded, as the segment stage opens them); remote inputs are not probed."""
    local = [local_path(r["uri"]) for r in rows if r.get("uri") and not is_remote(r["uri"])]
    return sorted({local[i] for i in (0, len(local) // 2, len(local) - 1)}) if local else []


def probe_nodes(lake: Lake, rows: list[dict]) -> int:
    """Run :func:`check_node` on every alive node with CPUs; raise a UserError for the first
    that fails. Returns the number of nodes probed."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]
    inputs = sample_inputs(rows)
    token = uuid.uuid4().hex
    marker = lake.path(f"_probe-{token}")
    put_bytes(lake.fs, marker, token.encode(), sync=False)
    try:
        task = ray.remote(num_cpus=0, max_retries=0)(check_node)
        refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(lake.uri, marker, token, inputs) for n in nodes]
        for node, result in zip(nodes, ray.get(refs)):
            if result is not None:
                what, path = result
                raise UserError(f"node {node.get('NodeManagerAddress')} ({node['NodeID'][:12]}) {what}: {path}; "
                                "every node must see the same lake and inputs: use an object store (s3://...) "
                                "or a folder shared at the same path on every node")
    finally:
        try:
            lake.fs.delete_file(marker)
        except OSError:
            pass
    return len(nodes)
