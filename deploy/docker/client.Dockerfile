# A hospital's image: fedshift + Flower's SuperNode. Build from the repository root:
#   docker build -f deploy/docker/client.Dockerfile -t fedshift-client .
# For a CUDA site, replace the torch line with the CUDA wheel of your driver.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
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
    && mkdir -p /var/lib/fedshift /var/lib/fedshift-integrity \
    && chown fedshift /var/lib/fedshift /var/lib/fedshift-integrity && chmod 700 /var/lib/fedshift-integrity
USER fedshift
WORKDIR /var/lib/fedshift
# site.toml and the certificates are mounted at /etc/fedshift (read-only), the data at /data (read-only);
# /var/lib/fedshift holds the privacy ledger, the egress log and the logs: keep it on a persistent volume
# /var/lib/fedshift-integrity holds the HMAC key and anchor of the ledger and egress log (integrity-key):
# a second volume, so that restoring or copying the state volume cannot roll the ledger back unseen
VOLUME ["/var/lib/fedshift", "/var/lib/fedshift-integrity"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["fedshift", "client"]
CMD ["--config", "/etc/fedshift/site.toml"]
