"""Importing this module patches the installed verl (:func:`topk_distill.integrations.verl.patch_verl`).

For a whole verl run - driver and every Ray worker - use verl's own plugin hook, which imports
the listed modules at ``import verl`` in every process that inherits the environment:

    export VERL_USE_EXTERNAL_MODULES=topk_distill.integrations.verl_autopatch

(on a multi-node Ray cluster, in the environment of ``ray start`` on every node, or in
``ray_kwargs.ray_init.runtime_env.env_vars``). See docs/VERL.md.
"""
from .verl import patch_verl

PATCH = patch_verl()
