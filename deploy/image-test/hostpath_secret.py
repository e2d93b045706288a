"""The Kubernetes example with its Secret volume as a host directory (argv[2]): for the image
test, to see how far `podman kube play` goes past the Secret volume."""

import sys

text = open(sys.argv[1]).read()
secret = """          secret:
            secretName: payments-token-sidecar
            defaultMode: 288 # 0440: owner and fsGroup read"""
if secret not in text:
    sys.exit("the manifest's secret volume moved: update deploy/image-test/hostpath_secret.py")
hostpath = f"          hostPath:\n            path: {sys.argv[2]}\n            type: Directory"
print(text.replace(secret, hostpath))
