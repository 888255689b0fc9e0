"""web: what pdserve's HTTP services (an instance's front, the router, the bootstrap
service) and the commands that start them share, above the base (``common/``)."""
