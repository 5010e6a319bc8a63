"""What both sides of the enclave boundary speak, so that neither imports the other.

The enclave server (enclave_server/) and the local backend that imitates AWS around it
(enclave_local/) agree here on the NSM's messages and on KMS's CiphertextForRecipient.
Nothing here imports either of them, or the host's CLI.
"""
