"""`aws` inside a body: the subset of the AWS CLI v2 a stock image's scripts use, on the world's
boto3, calling the world with the instance's role.

On EC2 the AWS CLI (installed on Amazon Linux) takes the instance profile's credentials from the
instance metadata service; bodies have no metadata service, so the SSM plug-in runs commands with
the world's endpoint and credentials attributed to the instance's role
(`AWS_ACCESS_KEY_ID=role-<instance id>`) in their environment, and this program on `PATH` as
`aws`. Supported: `aws [--region R] [--endpoint-url U] SERVICE OPERATION [--param value ...]`
with string parameters (`--secret-id` -> `SecretId`), `--output json|text` and `--query` (JMESPath),
errors as the CLI prints them (`An error occurred (Code) when calling the Op operation: ...`,
exit status 254). Run with the world's own Python (it has boto3).
"""

from __future__ import annotations

import datetime
import json
import os
import sys


def _pascal(option: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in option.split("-"))


def _default(o: object) -> str:
    if isinstance(o, (datetime.datetime, datetime.date)):
        return o.isoformat()
    if isinstance(o, bytes):
        import base64

        return base64.b64encode(o).decode()
    return str(o)


def main(argv: list[str]) -> int:
    import boto3
    import botocore.exceptions
    import jmespath

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    output, query = "json", None
    words: list[str] = []
    params: dict[str, str] = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            value = argv[i + 1] if i + 1 < len(argv) else ""
            i += 2
            if a == "--region":
                region = value
            elif a == "--endpoint-url":
                endpoint = value
            elif a == "--output":
                output = value
            elif a == "--query":
                query = value
            else:
                params[_pascal(a[2:])] = value
            continue
        words.append(a)
        i += 1
    if len(words) != 2:
        sys.stderr.write("usage: aws [options] <command> <subcommand> [parameters]\n")
        return 252
    service, operation = words
    client = boto3.client(service, region_name=region, endpoint_url=endpoint)
    method = getattr(client, operation.replace("-", "_"), None)
    if method is None:
        sys.stderr.write(f"aws: error: argument operation: Invalid choice: {operation}\n")
        return 252
    try:
        answer = method(**params)
    except botocore.exceptions.ClientError as e:
        err = e.response.get("Error", {})
        op = "".join(_pascal(p) for p in operation.split("-"))
        sys.stderr.write(
            f"\nAn error occurred ({err.get('Code')}) when calling the {op} operation: {err.get('Message')}\n"
        )
        return 254
    answer.pop("ResponseMetadata", None)
    if query:
        answer = jmespath.search(query, answer)
    if output == "text" and not isinstance(answer, (dict, list)):
        sys.stdout.write(("" if answer is None else str(answer)) + "\n")
    else:
        sys.stdout.write(json.dumps(answer, indent=4, default=_default, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
