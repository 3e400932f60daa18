"""lambdalet: AWS Lambda's model on any Kubernetes cluster.

The shared core: the Function spec model and its validation (``lambdalet.spec``), Lambda names and ARNs
(``lambdalet.names``) and the ``lambdalet`` command line (``lambdalet.cli``). Pure logic only: nothing in
this package opens sockets or talks to Kubernetes, except ``lambdalet.kubeclient`` — the Kubernetes
transport shared by the gateway's and the operator's one API module each — and ``lambdalet.build``
(which may run a compiler for embedded mode).
"""

__version__ = "0.1.0"
