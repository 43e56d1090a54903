"""Notebook panels (ipywidgets) for researchers and data owners.

See :mod:`healthlab.widgets.panels`: :class:`Catalogue`, :class:`RequestForm` and
:class:`OwnerInbox` work over any :class:`~healthlab.ledger.Ledger`; each action is
shown in the panel and printed, so it also appears in headless runs.
"""

from __future__ import annotations

from healthlab.widgets.panels import Catalogue, OwnerInbox, RequestForm, eth

__all__ = ["Catalogue", "OwnerInbox", "RequestForm", "eth"]
