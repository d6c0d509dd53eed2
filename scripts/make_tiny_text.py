"""Write autobatch/assets/tiny_text.jsonl, the built-in text sample: ~300 lines of original plain prose.

Each line is a run of consecutive sentences from the paragraphs below, cut to a drawn length between 20 and
600 characters, so the sample has the spread of lengths real data has (the probe measures the longest).
Deterministic: rerunning reproduces the file byte for byte.  Usage: python scripts/make_tiny_text.py
"""

import json
import random
import re
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "autobatch" / "assets" / "tiny_text.jsonl"
LINES = 300
MIN_CHARS, MAX_CHARS = 20, 600
SEED = 0

PARAGRAPHS = [
    """The village stood at the mouth of a narrow valley. A single road ran through it and on into the
    hills. In spring the river rose and filled the low meadows. The miller kept a boat tied behind his
    house for those weeks. Children walked to school along the top of the old wall, because the lane
    beneath it was always wet. Nobody could say who had built the wall, or when. The oldest woman in the
    parish said her grandmother had wondered the same thing. On market days carts came down from the
    farms before dawn. By noon the square was loud with dogs, bargains and the bell of the church clock.
    By evening it was quiet again.""",
    """The lighthouse keeper wrote in his log every four hours. Most entries were short. Wind north-east,
    fresh. Sea moderate. Two steamers passed, bound south. Some nights he added a line about the birds
    that struck the glass, or the colour of the sky before a gale. After thirty years the logs filled a
    whole shelf of the tower room. When the light was made automatic, the books were sent to a library
    in the city. A clerk there read them all, one winter, and said afterwards that she had never been so
    calm.""",
    """Bread is simple and difficult at once. Flour, water, salt and yeast are all it needs. The difficulty
    is time. Dough left too short a while is dense and pale; left too long, it collapses in the oven. A
    good baker watches the dough rather than the clock. She presses it with a floured finger and sees
    how slowly the mark fills. In a cold kitchen the same loaf may take twice as long as in summer. The
    recipe does not change. The weather does.""",
    """The train left at ten past six. It was nearly empty. A man in a grey coat slept with his hat over
    his eyes, and a girl opposite him read a book about the stars. Outside, the fields were white with
    frost. Telegraph poles went by like the ticks of a slow clock. At the junction three farmers got on,
    talking about the price of wool. The girl closed her book and listened. She had never thought that
    wool had a price. By the time the train reached the coast she knew more about sheep than she had
    ever meant to learn.""",
    """A map is a promise that the world will hold still. It never does. Rivers move their beds, towns grow
    into the fields around them, and forests are cut and planted again. The surveyors of the last
    century knew this. They dated every sheet and marked each change in red ink. An old map is therefore
    a kind of diary. It tells you what someone saw on a particular day. It is accurate about that day
    and about no other.""",
    """The garden was planted for the bees. There were rows of lavender, thyme and borage, and along the
    south wall a line of old apple trees. In June the whole place hummed. The owner kept six hives
    behind the shed. She did not wear gloves. She said the bees knew her by her step, and perhaps they
    did. Each September she took the honey off and gave most of it away. The jars had no labels.
    Everyone in the street knew where they came from.""",
    """Rain began in the afternoon and did not stop for three days. The gutters overflowed. The cellar of
    the inn took in water to the second step, and the landlord moved the barrels upstairs. Travellers
    who had meant to stay one night stayed four. They played cards, mended their boots and told each
    other the same stories twice. On the fourth morning the sky was suddenly clear. By nine o'clock the
    yard was empty, and the landlord counted his money and found he had done rather well out of the
    weather.""",
    """Learning to sail is mostly learning to wait. The wind is not yours to command. You can trim the
    sails, shift your weight and choose your course, but the boat moves only as fast as the air allows.
    Beginners pull too hard on the sheets and steer too much. The boat slows and complains. Given time,
    a sailor learns to make small changes and to notice what they do. The water shows the wind before it
    arrives. Dark patches on the surface mean a gust is coming. Smooth patches mean it has gone.""",
    """The museum had one room that nobody visited. It held a collection of keys, several thousand of them,
    each tied to a brown card with a number. The cards had once been matched to a ledger, but the ledger
    was lost. So the keys opened nothing that anyone could name. A student wrote her thesis on them. She
    traced a few to houses that had been pulled down, and one to a church door that still stood. She
    took that key to the church one evening and tried it. It turned at once, as if it had been used the
    day before.""",
    """Snow fell all night. In the morning the town was silent. Cars stood under white humps in the street,
    and the only tracks were those of a fox that had crossed the square and gone down towards the river.
    People came out slowly with shovels. Neighbours who had not spoken for months helped each other dig.
    By noon there were paths along every pavement and a snowman outside the post office wearing the
    postmaster's spare cap.""",
    """A watchmaker works at the scale of a grain of sand. His bench is high, so that the work sits close
    to his eyes. His tools are tweezers, screwdrivers thinner than a pin and a glass that he holds in
    one eye. He breathes through his nose and keeps his elbows on the bench. One sneeze can send a screw
    across the room, and some screws are never found. When he opens an old watch he can often tell who
    repaired it last. Every maker leaves small habits behind, like a signature nobody meant to write.""",
    """The orchard had been neglected for twenty years when the new owners came. Brambles filled the spaces
    between the trees, and half the branches were dead. They spent the first winter cutting and burning.
    In spring a few trees blossomed, thinly. The second year was better. By the third, the old varieties
    were fruiting again, apples with names that no shop sold: russets, pippins and one long green kind
    that nobody could identify. It kept until April in the cool of the barn and tasted faintly of pears.""",
    """Most of a letter is written before the pen touches the paper. The writer knows what she wants to
    say, or thinks she does. Then the first sentence will not come. She begins with the weather, as
    people always have, and after that the rest is easier. A letter can be read again years later. That
    is its danger and its value. A conversation is gone when it ends. A letter waits in a drawer, and
    sooner or later someone opens it.""",
    """The ferry crossed the strait twice a day. In summer it carried tourists with bicycles and cameras;
    in winter it carried the post, a few crates of vegetables and the doctor, who held a surgery on the
    island every Tuesday. The crossing took forty minutes in good weather. In a westerly gale it could
    take two hours, or not happen at all. The islanders kept full cupboards for that reason. They were
    not surprised by storms. They had been living with them for a thousand years.""",
    """Walking is the oldest way of thinking. Many people have noticed that a problem which will not yield
    at a desk comes apart on a long walk. The legs take over and the mind is free to wander. There is no
    need to go anywhere in particular. A circuit of the park will do, or the same streets every evening.
    What matters is the rhythm. After half an hour the day's noise fades and a quieter kind of attention
    begins.""",
    """The choir met on Thursday evenings in the hall behind the library. There were twenty-three singers
    and an upright piano that was always slightly flat. The conductor was a retired teacher who believed
    that anyone could sing if they listened hard enough. She was usually right. Over a winter the choir
    learned a mass, two carols and a long song about a drowned village that made the basses weep. In the
    spring concert they sang to a full hall, and afterwards nobody could remember why they had been so
    nervous.""",
    """Stone walls in the high country are built without mortar. Each stone is chosen to sit firmly on two
    below it. Long stones are laid across the wall at intervals to tie the two faces together. The top
    is finished with a row of stones set on edge. A well-made wall will stand for two centuries. A badly
    made one will fall in the first hard frost. The difference is not strength but patience: the good
    waller picks up each stone and turns it until it fits.""",
    """The library opened at nine. By five past, the same three people were always in their usual seats: an
    old man with the newspapers, a student with a pile of law books, and a woman who was writing, she
    said, a history of the county's windmills. She had been writing it for eleven years. The librarians
    brought her maps from the basement and asked how it was going. It was going well, she always said.
    It was nearly finished. Nobody believed this, and nobody minded.""",
    """Fog came in from the sea at dusk. It filled the harbour first, then the lower streets, then climbed
    the hill until the church tower vanished. Sounds changed. Footsteps seemed close when they were far
    away, and a voice across the road sounded as if it were in the room. The fishing boats stayed in.
    Their crews sat in the bar by the quay and argued about whether it would lift by morning. It did
    not. It lasted three days, and then went as quietly as it had come.""",
    """A kitchen table is the most useful piece of furniture in a house. Meals are eaten at it, homework is
    done at it, accounts are added up and letters written. Children draw on it and sometimes on the wood
    itself. A good table takes all of this. Its top becomes marked with rings from hot cups and the
    pressure of pencils. When the family moves, the table goes with them. It is the first thing carried
    in and the last thing anyone would sell.""",
    """Clouds have names, and the names are worth learning. Cumulus are the heaped clouds of fair
    afternoons. Stratus is the grey sheet that hides the sun for a whole day. Cirrus are the high thin
    streaks of ice that often come a day before rain. A sky full of small white ripples is called a
    mackerel sky, and sailors have long said that it means a change in the weather. They are right more
    often than not.""",
    """The bridge was finished in the autumn of a dry year. It had taken four years to build, and two men
    had died during the work. On the opening day the whole town walked across it and back, because there
    was nothing on the other side yet but a field and a farm. Within ten years there were houses, a
    school and a second church over there. People began to speak of the old side and the new side. Later
    still they forgot that there had ever been only one.""",
    """Ink was once made at home. Oak galls were crushed and soaked in rainwater, and iron salts were
    stirred in. The mixture turned black as it met the air. A little gum made it flow from a quill. Such
    ink bites into the paper and lasts for centuries, though in time it can eat right through. Old
    account books sometimes have holes where the clerk pressed hardest, usually on the totals.""",
    """The cat arrived in the spring and stayed. Nobody in the house had chosen her. She sat on the back
    step for a week, then in the kitchen, then on the best chair. She caught mice in the barn and left
    them on the mat by the door. She ignored her name. When the family went on holiday a neighbour fed
    her, and she ignored the neighbour too. But when they came home she was waiting at the gate, and she
    followed them from room to room for the rest of the day.""",
    """An engine is a set of small explosions made useful. Fuel and air are squeezed in a cylinder and lit,
    and the push of the hot gas turns a shaft. Everything else is detail: valves that open at the right
    moment, a pump for oil, a fan to carry off the heat. The detail is where engineers spend their
    lives. A gap a hair too wide or a spring a little too weak, and the engine coughs, loses power and
    finally stops.""",
    """The hill was steep and the path was loose with stones. Halfway up, the walkers stopped to rest on a
    flat rock. Below them the valley lay in the sun, its fields in squares of green and gold. A tractor
    crawled along one edge. Someone was burning leaves, and the smoke rose straight up into the still
    air. They drank from their bottles and said nothing. Then they went on, and by the top the wind had
    risen and the view was gone in cloud.""",
]


def sentences(paragraph: str) -> list[str]:
    """Split a paragraph on sentence ends, normalising the whitespace of the triple-quoted source."""
    text = " ".join(paragraph.split())
    return [s.strip() for s in re.split(r"(?<=[.!?:;])\s+(?=[A-Z])", text) if s.strip()]


def make_lines(n: int, rng: random.Random) -> list[str]:
    """n distinct lines, each a run of consecutive sentences no longer than a drawn target length.

    A run that reaches the end of a paragraph goes on into the next after a newline, so long lines exist.
    """
    flat = [(i, s) for i, p in enumerate(PARAGRAPHS) for s in sentences(p)]
    lines: list[str] = []
    seen: set[str] = set()
    while len(lines) < n:
        start = rng.randrange(len(flat))
        if rng.random() < 0.5:  # log-uniform: many short lines
            target = int(MIN_CHARS * (MAX_CHARS / MIN_CHARS) ** rng.random())
        else:  # uniform: plenty of long ones
            target = rng.randint(MIN_CHARS, MAX_CHARS)
        para, line = flat[start]
        for nxt_para, nxt in flat[start + 1:]:
            sep = " " if nxt_para == para else "\n"
            if len(line) + len(sep) + len(nxt) > target:
                break
            para, line = nxt_para, f"{line}{sep}{nxt}"
        if MIN_CHARS <= len(line) <= MAX_CHARS and line not in seen:
            seen.add(line)
            lines.append(line)
    return lines


def main() -> None:
    lines = make_lines(LINES, random.Random(SEED))
    OUT.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines), encoding="utf-8")
    lengths = sorted(len(line) for line in lines)
    median = lengths[len(lengths) // 2]
    print(f"wrote {len(lines)} lines to {OUT}: {lengths[0]}-{lengths[-1]} chars, median {median}")


if __name__ == "__main__":
    main()
