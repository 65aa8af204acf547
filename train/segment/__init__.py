"""The network side of segmenting new scans: task sets, their files, and inference.

Reading, resampling and mapping a scan back to its own grid need ``pipeline``, which
``train`` must not import; that half lives in ``flows.segment``.

* ``tasks``: `TaskSet` (what a network segments: class embeddings, values, names) and
  its safetensors file (``--save-task`` / ``--task``), tied to the network that made it;
* ``references``: task embeddings from labelled reference arrays (crops centred on each
  structure, shots averaged, as the in-context evaluation does);
* ``inference``: sliding-window probabilities of a task set over a prepared volume;
* ``saved_model``: a fine-tuned network with its class embeddings, saved without pickle.
"""
