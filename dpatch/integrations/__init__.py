"""Training-framework callbacks: ``dpatch.integrations.lightning`` and
``dpatch.integrations.transformers``.

Nothing is imported here, so ``import dpatch`` never pulls in a framework; import the
submodule of the framework you use (the ``lightning`` and ``hf`` extras install them).
"""
