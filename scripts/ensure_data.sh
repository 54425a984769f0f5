#!/usr/bin/env bash
# Fashion-MNIST, the real dataset the zoo and the Train page offer, comes from Debian's dataset-fashion-mnist
# package (installed in /usr/share/datasets/fashion-mnist, where ResViz finds it). Install it when missing and we can;
# everything else works without it, and the app says how to get it.
set -uo pipefail
[ -d /usr/share/datasets/fashion-mnist ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian's dataset-fashion-mnist (the real dataset of the zoo and the Train page)..."
  (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
    || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null)) \
    || echo "warning: could not install dataset-fashion-mnist; Fashion-MNIST tests will be skipped" >&2
else
  echo "note: Fashion-MNIST not found; 'sudo apt-get install dataset-fashion-mnist' adds it (optional)" >&2
fi
exit 0
