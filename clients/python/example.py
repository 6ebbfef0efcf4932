import os

import grpc

from keyauthority_client import KeyAuthority, VerifyCode, error_details

target = os.environ.get("KEY_AUTHORITY_TARGET", "127.0.0.1:50051")
with KeyAuthority(target, admin_token=os.environ["KEY_AUTHORITY_ADMIN_TOKEN"]) as client:
    issued = client.issue_key("acme", "billing worker", scopes=["payments:write"], ttl=3600)
    print("issued", issued.key.prefix)  # issued.secret is the whole key: shown once, store it

    answer = client.verify_key(issued.secret, required_scopes=["payments:write"])
    print("verify:", VerifyCode.Name(answer.code))  # VERIFY_CODE_VALID

    client.revoke_key("acme", issued.key.key_id)
    answer = client.verify_key(issued.secret)
    print("after revoke:", VerifyCode.Name(answer.code))  # VERIFY_CODE_REVOKED

    try:
        client.issue_key("acme", "")  # an empty name is refused
    except grpc.RpcError as error:
        details = error_details(error)
        # INVALID_ARGUMENT {'field': 'name'}
        print("refused:", details.reason, dict(details.metadata))
