"""Rules every other package shares, at the bottom of the import graph.

``harness``, ``quantizers``, ``probes`` and ``reports`` may import ``common``; ``common`` imports
none of them. Its torch-free modules (``files``, ``keyvalue``, ``prompts``) cost nothing at start-up,
so the file-only commands (``gate``, ``report``, ``compare``) can use them; the one module that
needs torch (``batching``) is imported only by code that already runs a model.

* :mod:`common.files`: atomic writes, JSON written atomically, JSONL reading;
* :mod:`common.keyvalue`: ``KEY=VALUE[,KEY=VALUE]`` items;
* :mod:`common.prompts`: chat rendering, prompt normalisation and the calibration/evaluation
  overlap rule;
* :mod:`common.batching`: left-padded token batches with position ids (torch);
* :mod:`common.layout`: where a model keeps its decoder layers, norms, projections, embedding and
  head (torch).
"""
