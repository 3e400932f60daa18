"""lambdalet: AWS Lambda's model on any Kubernetes cluster.

The shared core: the Function spec model and its validation (``lambdalet.spec``), Lambda names and ARNs
(``lambdalet.names``) and the ``lambdalet`` command line (``lambdalet.cli``). Pure logic only: nothing in
this package opens sockets or talks to Kubernetes; the gateway, the operator and the agent do.
"""

__version__ = "0.1.0"
