"""Synthetic settings of a comparison whose priors differ from the main synthetic model: each
setting overrides fields of `base.synthetic_model` (sae_lens.synthetic's own generators: firing
probability, magnitudes, correlation) and/or `base.sae.d_sae`; every main and margin run trains
again on it (compare/protocol.py `setting_runs`) and its metrics become claims

    <metric>@<name>,   metric in SETTING_METRICS,

paired by seed against the control and judged against the margin measured on the control's
margin seeds trained on the same setting (analysis/statistics.py), as every claim is.

Why: the main synthetic model (Zipf(1) firing, unit magnitudes, independent features, d_sae =
num_features) matches the priors the allocation rules were designed around, so a rule that leans
on its prior cannot fail there. `ARCHITECTURE_PRIORS` and `AUX_PRIORS` state what each rule
assumes (docs/architectures.md, docs/losses.md); `broken_priors` says which of those a setting
breaks, read from the fields it overrides."""

from __future__ import annotations

import copy
from typing import Any

from sae_lens_allocation.validation import one_line
from sae_lens_allocation.yaml_config import ConfigError

# (metric, better): the synthetic study's primary metric and its secondaries, claimed per setting.
SETTING_METRICS = (("explained_variance", 1), ("mcc", 1), ("f1", 1), ("dead_share", -1))
_SETTING_KEYS = {"name", "synthetic_model", "d_sae"}

# What each allocation rule assumes of the data (docs/architectures.md).
ARCHITECTURE_PRIORS = {
    "topk": "a fixed count of k latents on every sample",
    "topk_aux": "a fixed count of k latents on every sample",
    "batchtopk": "a batch-level budget of k N entries, shared unevenly over samples",
    "mutual_choice": "a batch-level budget of floor(k N) entries, no per-sample or per-latent count",
    "feature_choice": "per-latent capacities m_j summing to floor(k N), set by its capacity rule",
}
# What a Feature Choice capacity rule and an auxiliary loss assume (docs/architectures.md
# "Feature Choice capacities", docs/losses.md).
CAPACITY_PRIORS = {"uniform": "every latent fires equally often, on about k N / d_sae samples of a batch",
                   "zipf": "latent firing follows Zipf ranks, m_j proportional to rank_j^-s"}
AUX_PRIORS = {"aux_k": "every latent should fire (dead latents get the residual)",
              "aux_zipf": "latent firing should follow a Zipf fit (underused latents are pushed up)"}


def setting_config(cfg: dict[str, Any], setting: dict[str, Any]) -> dict[str, Any]:
    """The comparison config of a setting: base.synthetic_model updated with the setting's
    `synthetic_model` fields (a field it names replaces the base's whole value), base.sae.d_sae
    with its `d_sae`; same arms, seeds and eval."""
    out = copy.deepcopy(cfg)
    out["base"]["synthetic_model"].update(copy.deepcopy(setting.get("synthetic_model") or {}))
    if "d_sae" in setting:
        out["base"].setdefault("sae", {})["d_sae"] = setting["d_sae"]
    return out


def check_settings(value: Any, source: str, base: dict[str, Any]) -> list[dict[str, Any]]:
    """`settings`: a list of {name, synthetic_model: {SyntheticModelConfig fields}, d_sae: int},
    each naming at least one override; the setting's model must build in sae_lens.synthetic."""
    from sae_lens.synthetic import SyntheticModelConfig

    usage = "use a list of {name: NAME, synthetic_model: {fields of sae_lens.synthetic SyntheticModelConfig}, d_sae: N}"
    if value is None:
        return []
    if source != "synthetic":
        raise ConfigError("settings is not allowed with source: language_model; settings change the synthetic model")
    if not isinstance(value, list):
        raise ConfigError(f"settings={value!r} is not allowed; {usage}")
    names: list[str] = []
    for i, s in enumerate(value):
        if not isinstance(s, dict):
            raise ConfigError(f"settings[{i}] must be a mapping, got {type(s).__name__}")
        name = s.get("name")
        if not isinstance(name, str) or not name or name in names or not name.replace("-", "_").isidentifier():
            raise ConfigError(f"settings[{i}].name={name!r} is not allowed; {usage} (a new name of letters, digits, "
                              "_ and -)")
        names.append(name)
        unknown = sorted(set(s) - _SETTING_KEYS)
        if unknown:
            raise ConfigError(f"settings[{i}] ({name}): keys {unknown} are not allowed; {usage}")
        if len(s) < 2:
            raise ConfigError(f"settings[{i}] ({name}) changes nothing; {usage} (at least one of synthetic_model "
                              "and d_sae)")
        model = s.get("synthetic_model", {})
        if not isinstance(model, dict) or not model and "d_sae" not in s:
            raise ConfigError(f"settings[{i}] ({name}).synthetic_model={model!r} is not allowed; {usage}")
        if "hierarchy" in model:
            raise ConfigError(f"settings[{i}] ({name}).synthetic_model.hierarchy is not allowed; hierarchies are "
                              "the `hierarchies` key")
        d_sae = s.get("d_sae", 1)
        if isinstance(d_sae, bool) or not isinstance(d_sae, int) or d_sae < 1:
            raise ConfigError(f"settings[{i}] ({name}).d_sae={d_sae!r} is not allowed; use an integer >= 1")
        try:
            SyntheticModelConfig.from_dict({**copy.deepcopy(base.get("synthetic_model") or {}),
                                            **copy.deepcopy(model)})
        except (TypeError, ValueError, KeyError) as err:
            raise ConfigError(f"settings[{i}] ({name}).synthetic_model: {one_line(err)}") from None
    return value


def arm_priors(entry: dict[str, Any]) -> str:
    """The priors of an arm: its rule's, its capacity rule's and its auxiliary loss's (the
    training config's default where the arm does not set one)."""
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY

    fields = SAE_TRAINING_CLASS_REGISTRY[entry["architecture"]][1].__dataclass_fields__
    parts = [ARCHITECTURE_PRIORS.get(entry["architecture"], "no allocation prior of this project")]
    for key, priors in (("capacity", CAPACITY_PRIORS), ("aux_loss", AUX_PRIORS)):
        if key in fields:
            chosen = entry["sae"].get(key, fields[key].default)
            parts.append(f"{chosen}: {priors[chosen]}" if chosen in priors else f"{key} {chosen}")
    return "; ".join(parts)


def broken_priors(base: dict[str, Any], setting: dict[str, Any]) -> list[str]:
    """The priors of the main setting that `setting` breaks, read from the fields it overrides."""
    model = setting.get("synthetic_model") or {}
    base_model = base["synthetic_model"]
    out = []
    firing = model.get("firing_probability")
    if firing is not None and firing != base_model.get("firing_probability"):
        out.append(f"Zipf firing ({firing.get('generator_name')} firing probabilities): Feature Choice zipf, "
                   "aux_zipf" + (" (constant firing is Feature Choice uniform's prior)"
                                 if firing.get("generator_name") == "constant" else ""))
    if any(k in model for k in ("mean_firing_magnitudes", "std_firing_magnitudes")):
        out.append("unit magnitudes: every rule ranks by the size of z, which now also carries the magnitude")
    if "correlation" in model:
        out.append("independent features: co-firing spreads the true count per sample, against TopK's fixed k")
    d, features = setting.get("d_sae", base["sae"].get("d_sae")), model.get("num_features", base_model["num_features"])
    if d != features:
        out.append(f"d_sae = number of true features (here {d} latents for {features} features): Feature Choice "
                   "gives every latent a capacity, so latents beyond the features must fire anyway; aux_k revives them")
    return out


def settings_report(result: dict[str, Any], pm: Any) -> str:
    """The priors table (per arm) and per setting its overrides, the priors it breaks and the
    arms' mean +- sd of SETTING_METRICS; `pm(summary, digits)` formats mean +- sd."""
    cfg = result["config"]
    if not cfg.get("settings"):
        return ""
    lines = ["**Priors each arm assumes** (docs/architectures.md, docs/losses.md); the main synthetic model (Zipf(1) "
             "firing, unit magnitudes, independent features, d_sae = number of features) matches the Zipf and "
             "uniform-count priors, the settings below break them.", "", "| arm | assumes |", "|---|---|"]
    lines += [f"| {e['name']} | {arm_priors(e)} |" for e in cfg["architectures"]]
    arms = result["summary"]["arms"]
    for s in cfg["settings"]:
        name = s["name"]
        overrides = ", ".join(f"{k} {v}" for k, v in s.items() if k != "name")
        broken = "; ".join(broken_priors(cfg["base"], s)) or "none of the listed priors"
        lines += ["", f"**Setting `{name}`** ({overrides}; compare/settings.py): every arm retrained on each seed "
                  f"at its best lr, and the control on the margin seeds. Breaks: {broken}. Mean ± sd over seeds; the "
                  f"claims are `<metric>@{name}` in the verdict table.", "",
                  "| arm | " + " | ".join(m for m, _ in SETTING_METRICS) + " |",
                  "|---|" + "---|" * len(SETTING_METRICS)]
        lines += [f"| {arm} | " + " | ".join(pm(a["metrics"].get(f"{m}@{name}"), 3) for m, _ in SETTING_METRICS) + " |"
                  for arm, a in arms.items()]
    return "\n".join(lines)
