"""Names of the records exchanged between the ServerApp and the ClientApp."""

ARRAYS_KEY = "arrays"  # ArrayRecord: the shared adapter tensors (and nothing else)
METRICS_KEY = "metrics"  # MetricRecord: aggregate metrics of one site
CONFIG_KEY = "config"  # ConfigRecord: the server's round config
SITE_KEY = "site"  # ConfigRecord: the site's display name (configuration, not patient data)
WEIGHT_KEY = "num-examples"  # metric used as the FedAvg weight
PRIVACY_KEY = "privacy"  # ConfigRecord: the mechanism that protected the arrays, and the site's accounting
ANCHOR_KEY = "ewc-anchor"  # ArrayRecord: a consolidated EWC anchor the server sends with training messages
FISHER_KEY = "ewc-fisher"  # ArrayRecord: a diagonal Fisher (a site's release, or the consolidated one)
STATUS_KEY = "status"  # ConfigRecord: why a site sends no update this time (budget-exhausted, blocked, ...)
STATUS_BUDGET_EXHAUSTED = "budget-exhausted"  # the site's privacy budget cannot pay for this release
STATUS_BLOCKED = "blocked"  # the egress guard blocked an item of the reply
STATUS_ROUND_REFUSED = "round-refused"  # a training round out of order or past num-server-rounds (no charge)
SPLIT_KEY = "split"  # config of an evaluate message: the split the server asks for (val, test)
STATUS_SPLIT_NOT_ALLOWED = "split-not-allowed"  # an evaluate split outside the site's eval-splits (no train)
# Error reasons of a site's error replies (Flower's Error.reason): fixed words, never text from the site
APP_REFUSED = "app-refused: this site runs only its installed, approved fedshift app"  # a run's FAB refused
SITE_ERROR = "site-error: the site's ClientApp failed; the details stay in the site's log"  # an exception
# Mechanisms: what protected a release (a privacy record's "mechanism", a ledger entry's mechanism)
MECHANISM_DP_SGD = "dp-sgd"  # adapters trained by DP-SGD (a Poisson-subsampled Gaussian)
MECHANISM_DP_FISHER = "dp-fisher"  # a DP release of the EWC Fisher diagonal
MECHANISM_DP_LABEL_COUNTS = "dp-label-counts"  # the site's training label counts (Gaussian mechanism)
MECHANISM_DP_MOMENTS = "dp-moments"  # first and second moments of the site's projected features
MECHANISM_NONE = "none"  # dp=false at this site: nothing protected the release
