"""The feature names a model file carries, checked against model_meta.json's feature_list.

Columns are fed in feature_list order. A tree model or an sklearn estimator trained on a
DataFrame remembers its own column names: when a name of feature_list sits in another column
there, every prediction would read swapped inputs, silently. That model is refused.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

# Names a framework makes up when it was given none (LightGBM `Column_3`, XGBoost `f3`):
# they say nothing about the order, when each is its own position.
_GENERIC = re.compile(r"^(?:Column_|f)(\d+)$")


def feature_names_refusal(
    embedded: Sequence[Any] | None, feature_list: Sequence[str]
) -> str | None:
    """Why the model must be refused, or None. Names that merely differ (a pipeline that
    renamed its columns) are logged, not refused: the order of feature_list is used."""
    if embedded is None or not feature_list:
        return None
    # LightGBM stores "ret 1d" as "ret_1d": compare with whitespace as underscores.
    names = [_plain(str(n)) for n in embedded]
    wanted = [_plain(n) for n in feature_list]
    if not names or names == wanted:
        return None
    if len(names) != len(feature_list):
        return (f"the model file was trained on {len(names)} columns, model_meta.json"
                f" feature_list has {len(feature_list)}")
    if _made_up(names):
        return None
    column = {name: i for i, name in enumerate(names)}
    for i, name in enumerate(wanted):
        j = column.get(name)
        if j is not None and j != i:
            return (
                f"the model file was trained with {feature_list[i]!r} in column {j},"
                f" model_meta.json feature_list has it in column {i}: its inputs would be"
                f" swapped (the model's order: {', '.join(names)})"
            )
    log.warning(
        "the model file names its inputs %s, model_meta.json feature_list says %s:"
        " fed in feature_list order",
        ", ".join(names), ", ".join(feature_list),
    )
    return None


def _plain(name: str) -> str:
    return re.sub(r"\s+", "_", name.strip())


def _made_up(names: list[str]) -> bool:
    for position, name in enumerate(names):
        match = _GENERIC.match(name)
        if match is None or int(match.group(1)) != position:
            return False
    return True


def embedded_names(obj: Any) -> Sequence[Any] | None:
    """The column names a LightGBM or XGBoost booster, or an sklearn estimator fitted on a
    DataFrame, was trained with; None for anything else (a custom object's attributes of
    the same name mean what its author meant)."""
    try:
        lgb, xgb = sys.modules.get("lightgbm"), sys.modules.get("xgboost")
        if lgb is not None and isinstance(obj, lgb.Booster):
            return list(obj.feature_name())
        if xgb is not None and isinstance(obj, xgb.Booster):
            return list(obj.feature_names) if obj.feature_names else None
        sklearn_base = sys.modules.get("sklearn.base")
        if sklearn_base is not None and isinstance(obj, sklearn_base.BaseEstimator):
            names = getattr(obj, "feature_names_in_", None)
            if names is not None:
                return list(names)
            count = getattr(obj, "n_features_in_", None)  # fitted on an unnamed array
            return [f"f{i}" for i in range(count)] if isinstance(count, int) else None
    except Exception:  # a name we cannot read is no reason to refuse a model
        return None
    return None
