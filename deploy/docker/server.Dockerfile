# The coordinator image: fedshift + Flower's SuperLink. Build from the repository root:
#   docker build -f deploy/docker/server.Dockerfile -t fedshift-server .
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# CPU torch wheels keep the image small; the coordinator only aggregates adapters
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch<=2.14.1" "torchvision<=0.29.1"
WORKDIR /opt/fedshift
COPY pyproject.toml README.md ./
COPY common common
COPY server server
COPY client client
COPY simulations simulations
COPY deploy deploy
COPY tests tests
RUN pip install . && useradd --system --home /var/lib/fedshift fedshift \
    && mkdir -p /var/lib/fedshift && chown fedshift /var/lib/fedshift
USER fedshift
WORKDIR /var/lib/fedshift
# certificates and federation.toml are mounted at /etc/fedshift (read-only)
VOLUME ["/var/lib/fedshift"]
EXPOSE 9092
STOPSIGNAL SIGTERM
ENTRYPOINT ["fedshift", "server"]
CMD ["--config", "/etc/fedshift/federation.toml"]
