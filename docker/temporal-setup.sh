#!/bin/sh
# Prepares the Temporal server for Tollgate, for docker-compose.yml; runs in
# temporalio/admin-tools after the server's port opened, and the worker waits for it.
#
# The server image creates no namespace (the deprecated auto-setup image used to), so
# this creates TEMPORAL_NAMESPACE, then registers Tollgate's search attributes in it
# (tollgate/names.py SEARCH_ATTRIBUTES; tests/test_compose.py checks the lists agree).
#
# An open port does not mean the server answers yet, and a namespace it just created
# takes a few seconds to be known to every service, so each step is retried. Every step
# is idempotent: a namespace is created only when it does not exist, and creating a
# search attribute the namespace already has is a no-op on SQL visibility.
set -eu

: "${TEMPORAL_ADDRESS:?TEMPORAL_ADDRESS is not set}"
namespace=${TEMPORAL_NAMESPACE:?TEMPORAL_NAMESPACE is not set}

retry() {
    attempt=1
    until "$@"; do
        if [ "$attempt" -ge 60 ]; then
            echo "temporal-setup: gave up on: $*" >&2
            return 1
        fi
        attempt=$((attempt + 1))
        sleep 2
    done
}

ensure_namespace() {
    temporal operator namespace describe --namespace "$namespace" >/dev/null 2>&1 ||
        temporal operator namespace create --namespace "$namespace" --retention 24h
}

search_attribute() {
    temporal operator search-attribute create --namespace "$namespace" --name "$1" --type "$2"
}

retry temporal operator cluster health
retry ensure_namespace
retry search_attribute OrderStatus Keyword
retry search_attribute CustomerId Keyword
retry search_attribute MessageStatus Keyword
retry search_attribute RecipientId Keyword
retry search_attribute TollgateAlert Keyword
echo "temporal-setup: namespace ${namespace} ready"
