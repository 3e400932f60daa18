# The `lambdalet.test/http-echo` test image, for running the cluster tests against a real cluster
# (LAMBDALET_TEST_CLUSTER=existing). Build and load it, e.g. for kind:
#   docker build -t lambdalet.test/http-echo:latest -f tests/cluster/tools/images/http-echo.Dockerfile tests/cluster/tools/images
#   kind load docker-image lambdalet.test/http-echo:latest
FROM python:3.12-slim
COPY http_echo.py /opt/http-echo/http_echo.py
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["python", "/opt/http-echo/http_echo.py"]
