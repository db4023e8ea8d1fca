"""Memory-frugal optimizers as Optax transforms, and optimizer-state memory accounting.

Importing the package registers its optimizers with ``research.optimizers`` (the training loop's registry).
"""

from optim import registry as _galore_registry  # noqa: F401  (registers "galore", "natural_galore", "optax_galore")
from optim import diloco as _diloco  # noqa: F401  (registers the "diloco" training regime)
from optim import zo as _zo  # noqa: F401  (registers "mezo_sgd" and the "zo_spsa" training regime)
