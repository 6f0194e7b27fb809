# The coordinator image: fedshift + Flower's SuperLink + nginx (the Fleet-only public port). Build from
# the repository root:
#   docker build -f deploy/docker/server.Dockerfile -t fedshift-server .
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# nginx: fedshift server runs it (as the fedshift user) in front of the loopback-only SuperLink
RUN apt-get update && apt-get install -y --no-install-recommends nginx && rm -rf /var/lib/apt/lists/*
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
# certificates and federation.toml are mounted at /etc/fedshift (read-only); never put ca.key there
VOLUME ["/var/lib/fedshift"]
# the public port ([server] address): nginx, Fleet API only; the SuperLink's own port stays on 127.0.0.1
EXPOSE 9092
STOPSIGNAL SIGTERM
ENTRYPOINT ["fedshift", "server"]
CMD ["--config", "/etc/fedshift/federation.toml"]
