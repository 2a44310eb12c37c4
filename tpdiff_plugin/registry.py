"""Expose the plugin's networks to mmengine's ``MODELS`` registry under the ``tpdiff`` scope.

BasicSR's ``ARCH_REGISTRY`` is the primary registry. For mmengine/mmagic-style configs we add a
child registry of ``mmengine.registry.MODELS`` with scope ``tpdiff``, so that
``MODELS.build(dict(type='tpdiff.TPDiffNet', ...))`` works from any scope. mmengine (or
mmengine-lite, the same package) is optional: without it this is a no-op.
"""
_MM_MODELS = None


def mmengine_models():
    """The ``tpdiff`` child registry of mmengine's ``MODELS`` (created once), or None without mmengine."""
    global _MM_MODELS
    if _MM_MODELS is None:
        try:
            from mmengine.registry import MODELS, Registry
        except ImportError:
            return None
        _MM_MODELS = MODELS.children.get('tpdiff') or Registry('model', parent=MODELS, scope='tpdiff')
    return _MM_MODELS


def register_archs_with_mmengine(arch_modules):
    """Register every ARCH_REGISTRY class defined in ``arch_modules`` with the ``tpdiff`` mmengine scope."""
    registry = mmengine_models()
    if registry is None:
        return []
    from basicsr.utils.registry import ARCH_REGISTRY
    module_names = {m.__name__ for m in arch_modules}
    names = []
    for name, cls in ARCH_REGISTRY._obj_map.items():
        if getattr(cls, '__module__', None) in module_names:
            if name not in registry.module_dict:
                registry.register_module(name=name, module=cls)
            names.append(name)
    return names
