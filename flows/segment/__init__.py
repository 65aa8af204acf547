"""Segment new scans with a pretrained (in-context) or fine-tuned network.

```python
from maskbank.flows.segment import segment

for r in segment("runs/base", ["new_scans/"], references=[("ref.nii.gz", "ref_mask.nii.gz")],
                 out="seg"):
    print(r.scan_id, r.status, r.volume_ml)   # seg/<id>_seg.nii.gz on the scan's own grid
r.show()                                      # NiiVue in a notebook, else three slices
```

The library behind ``maskbank segment`` (`flows.commands.segment` only parses options).
It lives in ``flows`` because it joins ``pipeline`` (reading, geometry) and ``train``
(the network); the network-only parts are ``train.segment``.
"""

from __future__ import annotations

from .errors import SegmentError
from .result import SegmentResult
from .run import SegmentOptions, SegmentRun, segment

__all__ = ["SegmentError", "SegmentOptions", "SegmentResult", "SegmentRun", "segment"]
