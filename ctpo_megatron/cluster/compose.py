"""How the launcher composes the trainer's typed config with its `cluster` section.

`--cluster NAME` is the Hydra group option `cluster=NAME`; `--cluster FILE` becomes `~cluster`
(the `ClusterConfig` defaults) plus one `cluster.KEY=VALUE` per setting of the file; launcher
flags and `cluster.KEY=VALUE` arguments follow. These overrides (`cluster_selection`) are
composed with the trainer's config (`load_launch_config`) and handed to the trainer as they
are, so both read the same typed, validated values.
"""

from __future__ import annotations

import os
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from ctpo_megatron.cluster.config import CLUSTER_CONFIG_DIR, REMOVED_SETTINGS, ClusterConfig

if TYPE_CHECKING:  # the trainer's config pulls in torch; only the annotations need it here
    from ctpo_megatron.config.schema import TrainConfig

DICT_SETTINGS = frozenset(f.name for f in fields(ClusterConfig) if str(f.type).startswith("dict"))
"""Cluster settings that are dicts (`env`): their keys are open, so an override may add one."""


def hydra_value(value: Any) -> str:
    """`value` (a launcher flag, a YAML setting) in Hydra's override grammar: strings quoted,
    lists and dicts as `[a,b]` / `{k:v}`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    quote = "'" if "'" not in text else '"'
    if quote in text:
        raise ValueError(f"{text!r}: a setting cannot hold both quote characters")
    return quote + text + quote


def _flatten(prefix: str, data: dict) -> list[str]:
    out = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out += _flatten(f"{prefix}{key}.", value)
        else:
            out.append(f"{prefix}{key}={hydra_value(value)}")
    return out


def _cluster_override(override: str) -> str:
    """`KEY=VALUE` as a Hydra override of the cluster section. A key inside a dict setting
    (`env.NCCL_SOCKET_IFNAME=ib0`) may be new, which Hydra accepts only as `++` (add or set)."""
    path = override.split("=", 1)[0].split(".")
    return ("++" if len(path) > 1 and path[0] in DICT_SETTINGS else "") + f"cluster.{override}"


def cluster_selection(name: str, overrides: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Hydra overrides of the trainer's config that select cluster config `name` and apply the
    launcher's cluster settings `overrides` (`KEY=VALUE`, without the `cluster.` prefix).

    name: a `configs/cluster/<name>.yaml` group option (`cluster=<name>`), or a YAML file: its
    settings become `cluster.KEY=VALUE` overrides over the `ClusterConfig` defaults, so the
    trainer, given the same overrides, composes the same section. Raises ValueError naming
    `--cluster` when neither exists.
    """
    user = [_cluster_override(o) for o in overrides]
    if os.path.isfile(name):
        from omegaconf import OmegaConf
        from yaml import YAMLError

        try:
            data = OmegaConf.to_container(OmegaConf.load(name))
        except YAMLError as e:
            raise ValueError(f"--cluster {name}: not a YAML file: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"--cluster {name}: expected a mapping of cluster settings")
        return ["~cluster", *(_cluster_override(o) for o in _flatten("", data)), *user]
    if not os.path.isfile(os.path.join(CLUSTER_CONFIG_DIR, f"{name}.yaml")):
        known = sorted(f[:-len(".yaml")] for f in os.listdir(CLUSTER_CONFIG_DIR) if f.endswith(".yaml"))
        raise ValueError(f"--cluster {name!r}: no such file and no configs/cluster/{name}.yaml "
                         f"(known: {', '.join(known)})")
    return [f"cluster={name}", *user]


def load_launch_config(name: str, cluster_overrides: list[str] | tuple[str, ...] = (),
                       trainer_overrides: list[str] | tuple[str, ...] = ()) -> tuple["TrainConfig", list[str]]:
    """The trainer's typed config as the launcher composes it, with its `cluster` section.

    name: `--cluster` (see `cluster_selection`); cluster_overrides: `KEY=VALUE` cluster settings
    (launcher flags and `cluster.KEY=VALUE` arguments, prefix removed); trainer_overrides: the
    user's other Hydra overrides. The cluster section names the trainer's top-level config
    (`cluster.train_config`) and its `cluster.train_overrides`, so it is read first; then
    `configs/<train_config>.yaml` is composed with the train overrides, the cluster selection
    and the user's overrides, in the order the trainer gets them.

    Returns (config, the cluster selection as Hydra overrides: the trainer gets them too).
    Raises ValueError naming the setting on a bad key or value.
    """
    selection = cluster_selection(name, cluster_overrides)
    cluster = _load(selection, "config").cluster
    cfg = _load([*cluster.train_overrides, *selection, *trainer_overrides], cluster.train_config)
    return cfg, selection


def _load(overrides: list[str], config_name: str) -> "TrainConfig":
    """`load_config`, with Hydra's and OmegaConf's errors (unknown key, wrong type) as ValueError
    naming the override, its cause and, for a cluster setting, the known keys."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from ctpo_megatron.config.store import load_config

    try:
        return load_config(overrides, config_name=config_name)
    except (HydraException, OmegaConfBaseException) as e:
        message = " ".join(f"{e} {e.__cause__ or ''}".split())
        if "cluster" in message:
            known = [f.name for f in fields(ClusterConfig) if f.name not in REMOVED_SETTINGS]
            message += f" (cluster keys: {', '.join(known)})"
        raise ValueError(f"configs/{config_name}.yaml with overrides {overrides}: {message}") from None
