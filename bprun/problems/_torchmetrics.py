"""torchmetrics, imported without the second it spends on scipy.signal.

torchmetrics' package import runs `import scipy.signal` (in three places) only to add a
`hamming` alias that one audio metric's dependency expects. scipy.signal takes 1.2-1.3 s to
import, more than the rest of torchmetrics together, and no problem here uses it. While
torchmetrics loads, a stand-in module that already has the alias sits where scipy.signal
would be; it is removed afterwards, so a later `import scipy.signal` (by the user's code or
an audio metric) loads the real module as usual. When scipy.signal is loaded already, or
scipy is not installed, torchmetrics is imported as it is.
"""

from __future__ import annotations

import sys
import types


def load() -> types.ModuleType:
    """The torchmetrics package (imported once; later calls are a dictionary lookup)."""
    loaded = sys.modules.get("torchmetrics")
    if loaded is not None:
        return loaded
    if "scipy.signal" in sys.modules:
        import torchmetrics

        return torchmetrics
    stand_in = types.ModuleType("scipy.signal", "stands in while torchmetrics loads")
    stand_in.hamming = None  # the alias torchmetrics checks for: present, so it adds nothing
    sys.modules["scipy.signal"] = stand_in
    try:
        import torchmetrics
    finally:
        if sys.modules.get("scipy.signal") is stand_in:
            del sys.modules["scipy.signal"]
        scipy = sys.modules.get("scipy")
        if scipy is not None and vars(scipy).get("signal") is stand_in:
            del scipy.signal
    return torchmetrics
