"""Miras deep memories (registered mixers ``moneta``, ``yaad``, ``memora``, ``titans``) and their composable axes.

"It's All Connected: A Journey Through Test-Time Memorization, Attentional Bias, Retention, and Online
Optimization" (Behrouz et al., arXiv 2504.13173): ``memory`` (architecture), ``bias`` (attentional bias),
``retention``, ``spec`` (their composition and the learning algorithm), ``mixers`` (the layers and their configs).
"""
