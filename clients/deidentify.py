"""Turn a validated export into the table a training run may see.

The order is the point: direct identifiers are dropped first, before any other column is
touched, so no later step (or bug in it) can copy a name or a national ID into the output.
Then the columns a run with this purpose may not use are dropped (consent bookkeeping,
`ignore` columns, restricted classes the schema does not release for the purpose), the record
key is replaced by its keyed pseudonym, quasi-identifiers are generalised as the schema says,
and mapped columns take their fedrisk names. The report lists column names only.

Consent is decided on the validated table (`ExportSchema.consent_policy`), whose rows line up
with the de-identified table's: apply its mask to `DeidentifiedTable.table`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import pandas as pd

from clients.schema import ExportSchema, Generalisation
from clients.validation import ValidatedExport
from federation.errors import DataError
from privacy.pseudonym import PseudonymKey

PSEUDONYM = "pseudonym"
"""Column of the de-identified table holding each record's keyed pseudonym."""
_BOOKKEEPING_ROLES = ("consent", "consent-date", "consent-expiry", "ignore")


@dataclass(frozen=True)
class DeidentificationReport:
    """What `deidentify` did, by column name, in the order it did it (`steps`)."""

    purpose: str
    dropped_identifiers: tuple[str, ...]
    dropped_bookkeeping: tuple[str, ...]
    excluded_sensitive: tuple[str, ...]
    pseudonymised: str
    generalised: dict[str, str]
    renamed: dict[str, str]
    steps: tuple[str, ...]


@dataclass(frozen=True)
class DeidentifiedTable:
    """Rows in the validated table's order: `pseudonym`, the allowed model inputs under their
    fedrisk names (quasi-identifiers generalised), and the label. No identifier is left."""

    table: pd.DataFrame
    report: DeidentificationReport


def generalise(values: pd.Series, rule: Generalisation) -> pd.Series:
    """Coarsen one quasi-identifier: `age-band N` -> lower bound of its N-year band,
    `prefix K` -> first K characters, `month` -> first day of the month, `none` -> unchanged.
    Missing values stay missing."""
    if rule.kind == "age-band":
        banded = np.floor(values.astype("float64") / rule.size) * rule.size
        return banded.astype(values.dtype) if not values.isna().any() else banded
    if rule.kind == "prefix":
        return values.astype("string").str.slice(0, rule.size)
    if rule.kind == "month":
        dates = pd.to_datetime(values)
        return dates.dt.normalize() - pd.to_timedelta(dates.dt.day - 1, unit="D")
    if rule.kind == "none":
        return values
    raise DataError(f"unknown generalisation {rule.kind!r}")


def deidentify(table: Union[ValidatedExport, pd.DataFrame], schema: ExportSchema, key: PseudonymKey,
               *, purpose: str) -> DeidentifiedTable:
    """De-identify a validated export for a run with `purpose`.

    `table` is a `ValidatedExport` or its typed table; `key` is the node's pseudonymisation key.
    The input is never modified.
    """
    frame = table.table if isinstance(table, ValidatedExport) else table
    steps: list[str] = []

    identifiers = [c for c in schema.columns_by_role("direct-identifier") if c in frame.columns]
    frame = frame.drop(columns=identifiers)
    steps.append(f"dropped direct identifiers: {', '.join(identifiers) or 'none'}")

    record_key, label = schema.record_key, schema.label
    missing = [c for c in (record_key, label, *schema.training_columns(purpose)) if c not in frame.columns]
    if missing:
        raise DataError(f"cannot de-identify: table lacks column(s) {', '.join(missing)}")
    bookkeeping = [c for role in _BOOKKEEPING_ROLES for c in schema.columns_by_role(role) if c in frame.columns]
    excluded = [c for c in schema.excluded_columns(purpose) if c in frame.columns]
    kept = schema.training_columns(purpose)
    frame = frame.loc[:, [record_key, *kept, label]]
    steps.append(f"dropped consent and ignored columns: {', '.join(bookkeeping) or 'none'}")
    steps.append(f"excluded sensitive columns not released for {purpose}: {', '.join(excluded) or 'none'}")

    pseudonyms = key.pseudonymise(frame[record_key])
    frame = frame.drop(columns=[record_key])
    frame.insert(0, PSEUDONYM, pseudonyms)
    steps.append(f"replaced record key {record_key} by its pseudonym")

    generalised: dict[str, str] = {}
    for name in schema.columns_by_role("quasi-identifier"):
        rule = schema.column(name).generalisation
        if name in frame.columns and rule is not None and rule.kind != "none":
            frame[name] = generalise(frame[name], rule)
            generalised[name] = rule.describe()
    steps.append("generalised quasi-identifiers: "
                 + (", ".join(f"{c} ({r})" for c, r in generalised.items()) or "none"))

    renamed = {c.name: c.maps_to for c in schema.columns if c.maps_to and c.name in frame.columns}
    frame = frame.rename(columns=renamed)
    steps.append("renamed to fedrisk columns: " + (", ".join(f"{a} -> {b}" for a, b in renamed.items()) or "none"))

    report = DeidentificationReport(
        purpose=purpose, dropped_identifiers=tuple(identifiers), dropped_bookkeeping=tuple(bookkeeping),
        excluded_sensitive=tuple(excluded), pseudonymised=record_key, generalised=generalised,
        renamed=renamed, steps=tuple(steps))
    return DeidentifiedTable(table=frame, report=report)
