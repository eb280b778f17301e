"""The toy world: procedural scenes of coloured shapes, interleaved conversations of every kind
the real models see, and a ground-truth evaluator with no learned judge.

``scenes`` draws and renders scenes; ``conversations`` writes JSONL splits with the ground
truth of every turn in a ``meta`` field; ``reader`` reads an image back into a scene;
``evaluate`` scores what a fused model produced against the ground truth.
"""
