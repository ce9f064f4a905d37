"""Play DeepRec episodes through the OpenEnv server with a scripted agent (any OpenEnv client works the same).

Start the server first (``deeprec serve --port 8000``), then from the repository root:
``PYTHONPATH=. python examples/openenv_client.py --url http://127.0.0.1:8000 --users 0 1 2``.
"""

import argparse
import re

from deeprec_env.openenv_server import DeepRecAction, DeepRecClient

ap = argparse.ArgumentParser()
ap.add_argument("--url", default="http://127.0.0.1:8000")
ap.add_argument("--users", type=int, nargs="+", default=[0, 1, 2])
args = ap.parse_args()
with DeepRecClient(base_url=args.url).sync() as env:
    for user in args.users:
        result = env.reset(user=user)
        categories = re.findall(r"- categories: (.*)", result.observation.text)
        words = [c.strip() for line in categories for c in line.split(",")]
        top = max(set(words), key=words.count) if words else "popular films"
        call = f"The history leans towards {top}. <|begin_of_preference|> {top} <|end_of_preference|>"
        result = env.step(DeepRecAction(text=call))
        titles = re.findall(r"^\d+\. (.*)$", result.observation.text, flags=re.M)[:10]
        answer = "\n".join(f"{n}. {t}" for n, t in enumerate(titles, start=1))
        answer = f"Ranked.\n</think>\n<recommendation_list>\n{answer}\n</recommendation_list>"
        result = env.step(DeepRecAction(text=answer))
        info = result.observation.info
        print(f"user {user}: return {env.state().episode_return:.3f}, NDCG@10 {info['metrics']['ndcg@10']:.3f}")
