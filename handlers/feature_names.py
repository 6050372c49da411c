"""The feature names a model file carries, checked against model_meta.json's feature_list.

Columns are fed in feature_list order. A tree model or an sklearn estimator trained on a
DataFrame remembers its own column names: when a name of feature_list sits in another column
there, every prediction would read swapped inputs, silently. That model is refused.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)

# Names a framework makes up when it was given no names (LightGBM `Column_3`, XGBoost and
# others `f3`): they say nothing about the order.
_GENERIC = re.compile(r"^(Column_|f|x|feature_|col_?)\d+$", re.IGNORECASE)


def feature_names_refusal(
    embedded: Sequence[Any] | None, feature_list: Sequence[str]
) -> str | None:
    """Why the model must be refused, or None. Names that merely differ (a pipeline that
    renamed its columns) are logged, not refused: the order of feature_list is used."""
    if embedded is None or not feature_list:
        return None
    names = [str(n) for n in embedded]
    if not names or all(_GENERIC.match(n) for n in names) or names == list(feature_list):
        return None
    if len(names) != len(feature_list):
        return None  # the count check that follows says it in its own words
    column = {name: i for i, name in enumerate(names)}
    for i, name in enumerate(feature_list):
        j = column.get(name)
        if j is not None and j != i:
            return (
                f"the model file was trained with {name!r} in column {j},"
                f" model_meta.json feature_list has it in column {i}: its inputs would be"
                f" swapped (the model's order: {', '.join(names)})"
            )
    log.warning(
        "the model file names its inputs %s, model_meta.json feature_list says %s:"
        " fed in feature_list order",
        ", ".join(names), ", ".join(feature_list),
    )
    return None


def embedded_names(obj: Any) -> Sequence[Any] | None:
    """The column names a LightGBM/XGBoost booster or an sklearn estimator was trained with."""
    feature_name = getattr(obj, "feature_name", None)  # lightgbm.Booster
    if callable(feature_name):
        return list(feature_name())
    names = getattr(obj, "feature_names_in_", None)  # sklearn, fitted on a DataFrame
    if names is not None:
        return list(names)
    names = getattr(obj, "feature_names", None)  # xgboost.Booster
    return list(names) if isinstance(names, list | tuple) else None
