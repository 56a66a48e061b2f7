"""What several step scripts need, written once.

This package ships inside every job's source_dir (the ``steps/`` folder), so step scripts
import it as ``stepkit`` (the script's folder is on ``sys.path`` both on SageMaker and when
run by hand). It must only use relative imports internally so that the client side can
also import it as ``flanops.steps.stepkit``.
"""
