"""fedshift.deploy: the real deployment (Flower SuperLink at the coordinator, one SuperNode per hospital).

- :mod:`~fedshift.deploy.certs`: CA, server certificate, SuperNode keys (``fedshift certs``)
- :mod:`~fedshift.deploy.settings`: ``federation.toml`` and ``site.toml``, checked up front
- :mod:`~fedshift.deploy.server`: the coordinator daemon (``fedshift server``)
- :mod:`~fedshift.deploy.superlink`: Flower's SuperLink as the coordinator starts it (longer SQLite lock wait)
- :mod:`~fedshift.deploy.client`: the hospital daemon (``fedshift client``)
- :mod:`~fedshift.deploy.flwr_cli`: Flower's ``flwr`` command against the local SuperLink
- :mod:`~fedshift.deploy.processes`: child process trees, stopped whole

The runbook is ``deploy/README.md``.
"""
