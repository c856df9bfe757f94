"""The prefix cache: KV pages of computed prefixes, kept in the unified pool for later requests.

The KV of a token depends on the tokens before it and on the adapter (LoRA changes k and v), so
the cache is one radix tree per adapter identity: the adapter's name and the content version of
its weights (a reloaded adapter with new weights starts a new tree and never meets the old KV).
A node is a run of tokens with one page per token (pages are token-sized), so a prefix of any
length can be reused: a match that ends inside a node splits it there.

Ownership: a sequence that starts with a cached prefix reads the cache's pages and holds the
deepest node of its match; after each prefill chunk, and when it ends, the pages it computed
past that node join the tree as a child (they are never written again: a position's KV is
written once). Its other pages stay its own. `refs` of a node counts the sequences that hold a
node in its subtree, so a node at 0 serves no one: its pages are "idle" and go first when the
pool needs pages, from the tails of the least recently used leaves.

Pure Python, like the rest of the page accounting (pages.py).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

CacheKey = tuple[str, str]  # (adapter name or "" for the base model, content version)


@dataclass(eq=False)
class Node:
    tokens: list[int]
    pages: list[int]
    parent: Node | None  # None for a tree's root (no tokens)
    key: CacheKey
    children: dict[int, Node] = field(default_factory=dict)  # by first token
    refs: int = 0

    def path_pages(self) -> list[int]:
        """The pages of the prefix that ends with this node, in token order."""
        runs, node = [], self
        while node is not None:
            runs.append(node.pages)
            node = node.parent
        return [page for run in reversed(runs) for page in run]


class PrefixCache:
    def __init__(self):
        self.roots: dict[CacheKey, Node] = {}
        self.pages = 0  # pages held by the cache
        self.idle_pages = 0  # of those, pages no sequence uses: freed on demand
        self._idle_leaves: OrderedDict[Node, None] = OrderedDict()  # refs == 0, no children; oldest first

    # ------------------------------------------------------------- lookups

    def match(self, key: CacheKey, tokens: list[int], limit: int) -> tuple[Node | None, int]:
        """The deepest node whose prefix equals tokens[:n], n <= limit as large as cached, and n;
        (None, 0) on a miss. Splits a node where the match ends inside it. Call `hold` on the node
        before anything can free pages."""
        node, depth = self.roots.get(key), 0
        if node is None:
            return None, 0
        while depth < limit:
            child = node.children.get(tokens[depth])
            if child is None:
                break
            run = child.tokens
            n = min(len(run), limit - depth)
            k = 0
            while k < n and run[k] == tokens[depth + k]:
                k += 1
            if k < len(run):  # k >= 1: the child was found by its first token
                node, depth = self._split(child, k), depth + k
                break
            node, depth = child, depth + k
        return (node, depth) if depth else (None, 0)

    def hold(self, node: Node | None) -> None:
        """A sequence reads the pages of node's prefix: none of them can go until `release`."""
        while node is not None and node.parent is not None:
            if node.refs == 0:
                self.idle_pages -= len(node.pages)
                self._idle_leaves.pop(node, None)
            node.refs += 1
            node = node.parent

    def release(self, node: Node | None) -> None:
        while node is not None and node.parent is not None:
            node.refs -= 1
            if node.refs < 0:
                raise AssertionError("a prefix released more often than held")
            if node.refs == 0:
                self.idle_pages += len(node.pages)
                if not node.children:
                    self._idle_leaves[node] = None  # most recently used
            node = node.parent

    # ------------------------------------------------------------- growing

    def extend(self, key: CacheKey, held: Node | None, depth: int, tokens: list[int], pages: list[int]) -> tuple[Node | None, int]:
        """A sequence that holds `held` (its prefix tokens[:depth]) has computed the KV of all of
        `tokens` into `pages`: its pages past depth join the tree as a child of `held`, and it holds
        that child instead. If another sequence already cached more of the same tokens, nothing
        joins (its own pages stay its own). Returns what the sequence holds now."""
        if len(tokens) <= depth:
            return held, depth
        parent = held or self.roots.get(key)
        if parent is None:
            parent = self.roots[key] = Node([], [], None, key)
        if tokens[depth] in parent.children:
            return held, depth
        child = Node(list(tokens[depth:]), list(pages[depth:len(tokens)]), parent, key, refs=1)
        parent.children[tokens[depth]] = child
        self.pages += len(child.pages)
        return child, len(tokens)

    def _split(self, node: Node, k: int) -> Node:
        """Cuts node after its first k tokens; returns the new upper part (node keeps the rest)."""
        upper = Node(node.tokens[:k], node.pages[:k], node.parent, node.key, refs=node.refs)
        node.parent.children[upper.tokens[0]] = upper
        node.tokens, node.pages, node.parent = node.tokens[k:], node.pages[k:], upper
        upper.children[node.tokens[0]] = node
        return upper

    # ------------------------------------------------------------- freeing

    def evict(self, n: int) -> list[int]:
        """Up to n idle pages taken out of the cache (least recently used leaves, from their tails)."""
        freed: list[int] = []
        while len(freed) < n and self._idle_leaves:
            leaf = next(iter(self._idle_leaves))
            take = min(n - len(freed), len(leaf.pages))
            freed += leaf.pages[len(leaf.pages) - take:]
            del leaf.pages[len(leaf.pages) - take:]
            if leaf.pages:
                del leaf.tokens[len(leaf.pages):]
            else:
                self._remove_leaf(leaf)
        self.pages -= len(freed)
        self.idle_pages -= len(freed)
        return freed

    def _remove_leaf(self, leaf: Node) -> None:
        del self._idle_leaves[leaf]
        parent = leaf.parent
        del parent.children[leaf.tokens[0]]
        if parent.children:
            return
        if parent.parent is None:
            del self.roots[parent.key]
        elif parent.refs == 0:
            self._idle_leaves[parent] = None
            self._idle_leaves.move_to_end(parent, last=False)  # the rest of the same branch goes next

    def drop(self, adapter: str) -> list[int]:
        """Every page cached under this adapter's name (any version); none may be in use."""
        freed: list[int] = []
        for key in [k for k in self.roots if k[0] == adapter]:
            for node in self._nodes(self.roots.pop(key)):
                if node.refs:
                    raise AssertionError(f"adapter {adapter!r}: cached prefixes still in use")
                self._idle_leaves.pop(node, None)
                freed += node.pages
        self.pages -= len(freed)
        self.idle_pages -= len(freed)
        return freed

    def clear(self) -> list[int]:
        """Every idle page."""
        return self.evict(self.idle_pages)

    # ------------------------------------------------------------- accounting

    @staticmethod
    def _nodes(root: Node):
        stack = [root]
        while stack:
            node = stack.pop()
            stack += node.children.values()
            if node.parent is not None:
                yield node

    def nodes(self):
        for root in list(self.roots.values()):
            yield from self._nodes(root)

    def check(self, held: dict[Node, int]) -> None:
        """Raises AssertionError unless the tree agrees with itself and with `held` (node -> how
        many sequences hold it)."""
        pages = idle = 0
        for node in self.nodes():
            if len(node.tokens) != len(node.pages) or not node.pages:
                raise AssertionError(f"a node with {len(node.tokens)} tokens and {len(node.pages)} pages")
            if node.parent.children.get(node.tokens[0]) is not node or node.key != node.parent.key:
                raise AssertionError("a node is not where its parent says")
            refs = held.get(node, 0) + sum(c.refs for c in node.children.values())
            if node.refs != refs:
                raise AssertionError(f"a node counts {node.refs} users, {refs} hold it or its subtree")
            if (node.refs == 0 and not node.children) != (node in self._idle_leaves):
                raise AssertionError("the idle leaves are not the unused leaves")
            pages += len(node.pages)
            idle += len(node.pages) if node.refs == 0 else 0
        if (pages, idle) != (self.pages, self.idle_pages):
            raise AssertionError(f"the cache counts {self.pages} pages ({self.idle_pages} idle), its nodes hold {pages} ({idle})")
        for key, root in self.roots.items():
            if not root.children or root.key != key:
                raise AssertionError(f"an empty or misfiled root for {key}")
